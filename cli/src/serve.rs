//! `shardlock node --metrics-addr`: Prometheus text on `/metrics`, the
//! coordinator's health on `/healthz` (readiness) and `/livez` (liveness).
//!
//! The exporter is `metrics-exporter-prometheus` without its own listener
//! (it cannot answer `/healthz`); a small hyper server serves both.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use shardlock::{CancellationToken, Health};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

/// Installs the Prometheus recorder for this process. Call it before the
/// coordinator starts: metric handles registered earlier stay no-ops.
pub(crate) fn install_recorder() -> Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .install_recorder()
        .context("installing the Prometheus metrics recorder")
}

/// What the endpoints read.
pub(crate) struct Endpoints {
    /// Renders the Prometheus text.
    pub(crate) metrics: PrometheusHandle,
    /// The coordinator's current health.
    pub(crate) health: Box<dyn Fn() -> Health + Send + Sync>,
}

/// Binds `addr` before the coordinator starts, so a taken port fails the
/// node at once.
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {addr}"))
}

/// Serves `/metrics`, `/healthz` and `/livez` on `listener` until `stop`
/// fires.
pub(crate) fn spawn(
    listener: TcpListener,
    endpoints: Endpoints,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /metrics, /healthz and /livez");
    }
    let endpoints = Arc::new(endpoints);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "metrics endpoint: accept failed");
                    continue;
                }
            };
            let endpoints = endpoints.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let endpoints = endpoints.clone();
                    async move { Ok::<_, Infallible>(answer(&endpoints, &req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    served = conn => if let Err(e) = served {
                        debug!(%peer, error = %e, "metrics endpoint: connection ended");
                    },
                    () = stop.cancelled() => {}
                }
            });
        }
    })
}

fn answer(endpoints: &Endpoints, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut response = text(StatusCode::OK, endpoints.metrics.render());
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        "/healthz" => {
            let health = (endpoints.health)();
            let status = if health.is_ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, format!("{health}\n"))
        }
        "/livez" => {
            let health = (endpoints.health)();
            let status = if health.is_alive() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, format!("{health}\n"))
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /livez\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
