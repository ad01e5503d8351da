//! The loss signal: a socket watched for its end while tiberius is idle.
//!
//! tiberius reads its socket only while a request runs, so a server that
//! ends an idle session (`KILL`, a restart, a failover, an idle timeout)
//! would go unnoticed until the next statement. The driver therefore hands
//! tiberius a [`WatchedStream`] instead of the bare socket:
//!
//! - **Writes** go straight to the socket's write half.
//! - **Reads** come from a bounded in-memory pipe. A pump task owns the
//!   socket's read half and reads it *all the time*, forwarding each chunk
//!   into the pipe. The moment it reads end-of-file or an error it fires the
//!   session's [`SessionSignals::fire_lost`] and then closes the pipe, so
//!   tiberius sees the same end (EOF, or the same I/O error) on its next
//!   read. No polling: the pump sleeps in the socket read, woken by the
//!   kernel when bytes, a FIN or an RST arrive.
//! - Bytes that arrive while tiberius is idle (e.g. the error message a
//!   server sends before it closes) are kept in the pipe, in order, and
//!   delivered to tiberius before the end. TLS runs inside tiberius over
//!   this stream, so the pump only ever sees opaque bytes.
//!
//! # Invariants
//!
//! 1. tiberius reads exactly the bytes the socket delivered, in order, then
//!    the socket's end (EOF or the error).
//! 2. The signal fires once the pump sees the socket end, unless the driver
//!    itself was closing the stream (shut down its write side, or dropped
//!    it): a graceful close is not a loss.
//! 3. Memory is bounded: at most [`PIPE_CHUNKS`] chunks of at most
//!    [`CHUNK`] bytes wait in the pipe. When it is full (tiberius is in the
//!    middle of reading a large response) the pump waits; the request in
//!    flight then sees the socket's end itself.
//! 4. Dropping the stream stops the pump and closes the socket (both halves
//!    are dropped), so the server ends the session and frees its locks.
//!
//! # Detection bound
//!
//! By construction, the signal fires as soon as the FIN or RST of the
//! server's side reaches this host and the runtime schedules the pump: one
//! network delay plus a wake-up, well under [`DEFAULT_LOSS_SIGNAL_BOUND`]
//! (50 ms) on a healthy network. No SQL Server can run where this driver is
//! developed, so the bound is stated from the construction, not measured;
//! the contract suite measures it against a real server when
//! `SHARDLOCK_MSSQL_URL` is set.
//!
//! It does **not** cover a silent end: a network cut, or a server host that
//! vanishes without sending a FIN or RST, sends nothing to read. That case is
//! the coordinator's: its verify deadline (`lock_loss_timeout`) fences the
//! node, and the server keeps the locks for at least its `KeepAlive` window
//! ([`lock_release_window`](shardlock_core::Driver::lock_release_window)),
//! which the coordinator's timings are checked against.
//!
//! [`DEFAULT_LOSS_SIGNAL_BOUND`]: crate::DEFAULT_LOSS_SIGNAL_BOUND

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use shardlock_core::SessionSignals;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// The most bytes one socket read forwards (one TDS packet is at most 32 KiB;
/// tiberius negotiates 4 KiB by default).
pub(crate) const CHUNK: usize = 16 * 1024;

/// How many chunks may wait in the pipe for tiberius.
pub(crate) const PIPE_CHUNKS: usize = 32;

/// A session's socket as tiberius sees it: writes go to the socket, reads
/// come from the pump (see the module docs).
pub(crate) struct WatchedStream<W = OwnedWriteHalf> {
    write: W,
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
    ended: bool,
    closing: Arc<AtomicBool>,
    signals: SessionSignals,
    pump: JoinHandle<()>,
}

impl WatchedStream<OwnedWriteHalf> {
    /// Watches a TCP connection (plain or resolved through SQL Browser).
    /// Must be called inside a tokio runtime (the pump is a task).
    pub(crate) fn tcp(stream: TcpStream) -> Self {
        let (read, write) = stream.into_split();
        Self::new(read, write)
    }
}

impl<W> WatchedStream<W> {
    /// Starts the pump on `read` and answers the stream tiberius uses, with
    /// fresh signals that fire when `read` ends. Must be called inside a
    /// tokio runtime.
    pub(crate) fn new<R>(read: R, write: W) -> Self
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let signals = SessionSignals::new();
        let closing = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(PIPE_CHUNKS);
        let pump = tokio::spawn(pump(read, tx, signals.clone(), Arc::clone(&closing)));
        Self {
            write,
            rx,
            chunk: Vec::new(),
            pos: 0,
            ended: false,
            closing,
            signals,
            pump,
        }
    }

    /// The signals the pump fires when the connection ends.
    pub(crate) fn signals(&self) -> SessionSignals {
        self.signals.clone()
    }
}

/// Reads `read` until its end, forwarding every chunk, then fires the loss
/// signal (unless the driver was closing) and closes the pipe.
async fn pump<R>(
    mut read: R,
    tx: mpsc::Sender<io::Result<Vec<u8>>>,
    signals: SessionSignals,
    closing: Arc<AtomicBool>,
) where
    R: AsyncRead + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        // Room first, so a full pipe holds the pump before it reads (bounded
        // memory); the reader is gone when this fails (the stream dropped).
        let Ok(permit) = tx.reserve().await else {
            return;
        };
        match read.read(&mut buf).await {
            Ok(0) => {
                ended(&signals, &closing, None);
                return; // dropping `tx` closes the pipe: tiberius reads EOF
            }
            Ok(n) => permit.send(Ok(buf[..n].to_vec())),
            Err(e) => {
                ended(&signals, &closing, Some(&e));
                permit.send(Err(e));
                return;
            }
        }
    }
}

fn ended(signals: &SessionSignals, closing: &AtomicBool, error: Option<&io::Error>) {
    if closing.load(Ordering::Acquire) {
        debug!(error = ?error, "SQL Server connection ended after the driver closed it");
        return;
    }
    let reason = match error {
        None => {
            "the server closed the connection (KILL, restart, failover or idle timeout)".to_string()
        }
        Some(e) => format!("the connection failed: {e}"),
    };
    warn!(%reason, "SQL Server connection ended: signalling the session's loss");
    signals.fire_lost(reason);
}

impl<W> Drop for WatchedStream<W> {
    fn drop(&mut self) {
        // The driver drops its connection on purpose: not a loss. Stopping
        // the pump drops the read half, so the socket closes.
        self.closing.store(true, Ordering::Release);
        self.pump.abort();
    }
}

impl<W: Unpin> AsyncRead for WatchedStream<W> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.pos < this.chunk.len() {
                let n = buf.remaining().min(this.chunk.len() - this.pos);
                buf.put_slice(&this.chunk[this.pos..this.pos + n]);
                this.pos += n;
                return Poll::Ready(Ok(()));
            }
            if this.ended {
                return Poll::Ready(Ok(())); // EOF
            }
            match ready!(this.rx.poll_recv(cx)) {
                Some(Ok(chunk)) => {
                    this.chunk = chunk;
                    this.pos = 0;
                }
                Some(Err(e)) => {
                    this.ended = true;
                    return Poll::Ready(Err(e));
                }
                None => {
                    this.ended = true;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for WatchedStream<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // The driver closes the connection (tiberius' `close`): the server's
        // answering FIN is expected, not a loss.
        this.closing.store(true, Ordering::Release);
        Pin::new(&mut this.write).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.write.is_write_vectored()
    }
}

impl<W> std::fmt::Debug for WatchedStream<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchedStream")
            .field("buffered", &(self.chunk.len() - self.pos))
            .field("ended", &self.ended)
            .field("closing", &self.closing.load(Ordering::Relaxed))
            .field("lost", &self.signals.is_lost())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const WITHIN: Duration = Duration::from_secs(2);

    async fn lost_within(signals: &SessionSignals) -> Duration {
        let started = Instant::now();
        tokio::time::timeout(WITHIN, signals.lost().cancelled())
            .await
            .expect("the loss signal fires");
        started.elapsed()
    }

    /// A loopback TCP pair: (watched client, server side).
    async fn tcp_pair() -> (WatchedStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let client = client.expect("connect");
        let (server, _) = server.expect("accept");
        (WatchedStream::tcp(client), server)
    }

    #[tokio::test]
    async fn a_server_side_close_while_idle_fires_the_signal() {
        let (client, server) = tcp_pair().await;
        let signals = client.signals();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!signals.is_lost(), "an idle, open connection is not lost");
        drop(server); // the server ends the session; nobody reads the client
        let took = lost_within(&signals).await;
        eprintln!("loss signalled {took:?} after the server closed (loopback)");
        let reason = signals.reason().unwrap_or_default();
        assert!(reason.contains("server closed"), "{reason}");
        drop(client);
    }

    #[tokio::test]
    async fn bytes_sent_before_the_close_reach_the_reader_then_eof() {
        let (mut client, mut server) = tcp_pair().await;
        let signals = client.signals();
        let message = b"session killed by the administrator".repeat(2000); // > CHUNK
        server.write_all(&message).await.expect("write");
        drop(server);
        lost_within(&signals).await;
        // Nobody read while idle; everything is still there, then EOF.
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, message);
        assert_eq!(client.read(&mut [0u8; 8]).await.expect("eof"), 0);
    }

    #[tokio::test]
    async fn a_reset_is_a_loss_and_reaches_the_reader_as_an_error() {
        let (mut client, server) = tcp_pair().await;
        let signals = client.signals();
        // The client sends something the server never reads: closing with
        // unread data makes the kernel send an RST instead of a FIN.
        client.write_all(b"unread request").await.expect("write");
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(server);
        lost_within(&signals).await;
        let reason = signals.reason().unwrap_or_default();
        assert!(
            reason.contains("failed") || reason.contains("closed"),
            "{reason}"
        );
        let mut sink = Vec::new();
        let read = client.read_to_end(&mut sink).await;
        // An RST is an error; a FIN (some kernels) an EOF. Either way, it ends.
        assert!(read.is_err() || read.is_ok_and(|n| n == 0), "ends");
    }

    #[tokio::test]
    async fn writes_go_to_the_socket_and_a_graceful_close_is_not_a_loss() {
        let (mut client, mut server) = tcp_pair().await;
        let signals = client.signals();
        client.write_all(b"ping").await.expect("write");
        client.flush().await.expect("flush");
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.expect("server reads");
        assert_eq!(&got, b"ping");
        server.write_all(b"pong").await.expect("write");
        client.read_exact(&mut got).await.expect("client reads");
        assert_eq!(&got, b"pong");
        // The driver closes: shutdown, then the server answers with its FIN.
        client.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        server
            .read_to_end(&mut rest)
            .await
            .expect("server sees EOF");
        drop(server);
        let mut eof = Vec::new();
        client.read_to_end(&mut eof).await.expect("client sees EOF");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!signals.is_lost(), "a graceful close is not a loss");
    }

    #[tokio::test]
    async fn dropping_the_stream_closes_the_socket_without_a_loss() {
        let (client, mut server) = tcp_pair().await;
        let signals = client.signals();
        drop(client);
        let mut rest = Vec::new();
        tokio::time::timeout(WITHIN, server.read_to_end(&mut rest))
            .await
            .expect("the server sees the close at once")
            .expect("EOF");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!signals.is_lost());
    }

    #[tokio::test]
    async fn a_full_pipe_holds_the_pump_and_loses_nothing() {
        let (client_io, mut server_io) = tokio::io::duplex(CHUNK);
        let (read, write) = tokio::io::split(client_io);
        let mut client = WatchedStream::new(read, write);
        let signals = client.signals();
        let total = CHUNK * (PIPE_CHUNKS + 8);
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                server_io.write_all(&data).await.expect("write");
                // The server end is dropped here: EOF after the data.
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!signals.is_lost(), "not at the end yet: the pipe is full");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("read");
        writer.await.expect("writer");
        assert_eq!(got.len(), data.len());
        assert!(got == data, "same bytes, same order");
        lost_within(&signals).await;
    }
}
