//! One container per database image, shared by every test process
//! (feature `containers`): where the real-database harnesses get their
//! server.
//!
//! # Which server
//!
//! 1. The URL variable ([`Spec::url_env`], e.g. `SHARDLOCK_PG_URL`) is set:
//!    that server, no Docker.
//! 2. Otherwise a container of the image named by [`Spec::image_env`] (e.g.
//!    `SHARDLOCK_PG_IMAGE`, default [`Spec::default_image`]), through the
//!    testcontainers module the harness passes. With [`Spec::local_only`]
//!    the image is used only when `docker image inspect` finds it, never
//!    pulled (SQL Server's image is large and licensed).
//! 3. No Docker, no image: [`shared`] prints the loud `SKIPPED` line of
//!    [`skip`] naming the URL variable (and fails instead when
//!    `SHARDLOCK_REQUIRE` names the group, as in CI) and answers `None`.
//!
//! # One container for all tests
//!
//! nextest runs every test in its own process, and every `#[tokio::test]`
//! has its own runtime, so a container handle kept in a `static` would
//! neither be shared across tests nor be dropped (removed) at the end, and
//! a server may take long to start (SQL Server: 10–30 s). The container is
//! therefore shared through Docker itself: it has a fixed name derived from
//! the image (`shardlock-test-<name>-<image>`), the label
//! `shardlock.test=<group>`, and testcontainers' `ReuseDirective::Always`,
//! so the first test process creates it and every later process (of this
//! run and of later runs, of every test binary) finds it by name and reuses
//! it; two processes racing to create it get a name conflict, and the
//! loser's retry finds the winner's container. Reused containers are never
//! removed by testcontainers, so no handle needs to stay alive and nothing
//! is tied to a runtime: [`SharedContainer`] keeps only the URL, so a
//! `cargo test` process (many tests, one process) asks Docker once. The
//! container outlives the test run; remove it with
//! `docker rm -f $(docker ps -aq --filter label=shardlock.test=<group>)`
//! (needed after rebuilding the image, so the new image is used). Tests
//! never wipe shared state: every test uses fresh key names.

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

pub use testcontainers;
use testcontainers::runners::SyncRunner;
use testcontainers::{Image, ImageExt, ReuseDirective};

use crate::skip;

/// What a harness's shared server is.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// The test group in skip lines and the label value
    /// (`shardlock.test=<group>`), e.g. `postgres`.
    pub group: &'static str,
    /// Short name in the container's name, e.g. `pg`.
    pub name: &'static str,
    /// The variable naming a server to use instead of a container.
    pub url_env: &'static str,
    /// The variable naming the image (`name:tag`).
    pub image_env: &'static str,
    /// The image when [`image_env`](Self::image_env) is not set.
    pub default_image: &'static str,
    /// The port the server listens on in the container.
    pub port: u16,
    /// Use the image only when it is present locally; never pull it.
    pub local_only: bool,
    /// How long the container may take to become ready.
    pub startup_timeout: Duration,
}

impl Spec {
    /// The image to use: [`image_env`](Self::image_env)'s value, or
    /// [`default_image`](Self::default_image).
    pub fn image(&self) -> String {
        std::env::var(self.image_env)
            .ok()
            .filter(|i| !i.trim().is_empty())
            .unwrap_or_else(|| self.default_image.to_string())
    }

    /// The container's fixed name: `shardlock-test-<name>-<image>`, with
    /// every character but ASCII letters, digits and `-` made a `-`.
    fn container_name(&self, image: &str) -> String {
        format!("shardlock-test-{}-{image}", self.name)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    }
}

/// A [`Spec`] and, once asked, the server's URL; meant to be a `static` of
/// the harness, so one test process asks Docker once.
#[derive(Debug)]
pub struct SharedContainer {
    spec: Spec,
    url: OnceLock<Result<String, String>>,
}

impl SharedContainer {
    /// A shared container as `spec` says.
    pub const fn new(spec: Spec) -> Self {
        Self {
            spec,
            url: OnceLock::new(),
        }
    }

    /// The spec.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }
}

/// The URL of `server`: the URL variable's value, or the shared container
/// of `image` (started on first use, named and tagged from the spec's image
/// variable), whose URL `url` builds from the host and mapped port. `None`
/// after a loud [`skip`] line when neither is available.
pub async fn shared<I>(
    server: &'static SharedContainer,
    image: I,
    url: impl FnOnce(&str, u16) -> String + Send + 'static,
) -> Option<String>
where
    I: Image + Clone + Send + 'static,
{
    let spec = &server.spec;
    if let Ok(url) = std::env::var(spec.url_env) {
        if !url.trim().is_empty() {
            return Some(url);
        }
    }
    // testcontainers' blocking runner has a runtime of its own: start it
    // from a plain thread.
    let found = tokio::task::spawn_blocking(move || {
        server
            .url
            .get_or_init(|| start(&server.spec, image, url))
            .clone()
    })
    .await
    .unwrap_or_else(|e| Err(format!("container start panicked: {e}")));
    match found {
        Ok(url) => Some(url),
        Err(why) => {
            skip(spec.group, &why, spec.url_env);
            None
        }
    }
}

/// `name:tag` split at the tag's colon (a registry port is not a tag).
pub fn split_image(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (image, "latest"),
    }
}

/// True when `docker image inspect` finds `image` locally.
fn image_present(image: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", image])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn start<I>(spec: &Spec, image: I, url: impl FnOnce(&str, u16) -> String) -> Result<String, String>
where
    I: Image + Clone,
{
    let wanted = spec.image();
    if spec.local_only && !image_present(&wanted) {
        return Err(format!(
            "no image {wanted} here (or no Docker; {} names another)",
            spec.image_env
        ));
    }
    let (name, tag) = split_image(&wanted);
    let container_name = spec.container_name(&wanted);
    let mut last = String::new();
    for attempt in 0..5 {
        let request = image
            .clone()
            .with_name(name)
            .with_tag(tag)
            .with_container_name(&container_name)
            .with_label("shardlock.test", spec.group)
            .with_reuse(ReuseDirective::Always)
            .with_startup_timeout(spec.startup_timeout);
        match request.start() {
            Ok(container) => {
                let host = container.get_host().map_err(|e| e.to_string())?;
                let port = container
                    .get_host_port_ipv4(spec.port)
                    .map_err(|e| e.to_string())?;
                // Reused containers are not removed on drop.
                drop(container);
                return Ok(url(&host.to_string(), port));
            }
            Err(e) => {
                last = format!("cannot start container {container_name} from {wanted}: {e}");
                // Another test process is creating the same container: the
                // next attempt finds and reuses it. Anything else (no
                // Docker, no image) fails at once.
                let text = e.to_string();
                let conflict = text.contains("409")
                    || text.contains("Conflict")
                    || text.contains("already in use");
                if !conflict {
                    break;
                }
                std::thread::sleep(Duration::from_millis(500 * (attempt + 1)));
            }
        }
    }
    Err(last)
}
