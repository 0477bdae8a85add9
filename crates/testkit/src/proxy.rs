//! [`GrpcProxy`]: etcd's own fan-out tier, `etcd grpc-proxy start`, in front of an
//! [`EtcdCluster`], for side-by-side runs against keywatch's mirror mode.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::thread::JoinHandle;

use crate::etcd::{EtcdCluster, metric};
use crate::output::{Output, spawn_watched};
use crate::{Error, GUARD, free_ports};

/// The line grpc-proxy logs once it serves clients.
const READY: &str = "started gRPC proxy";

/// One `etcd grpc-proxy start` process on free loopback ports (plain HTTP towards its
/// clients, or TLS with [`GrpcProxy::start_tls`]; the cluster's TLS files towards etcd), its
/// metrics on a port of its own. Killed on
/// drop; nothing sleeps for readiness (it is ready when it logs that it started).
///
/// ```no_run
/// // no_run: needs etcd installed, which a doc test cannot count on.
/// let cluster = testkit::EtcdCluster::builder().start_cluster()?;
/// let proxy = testkit::GrpcProxy::start(&cluster)?;
/// let endpoint = proxy.endpoint(); // http://127.0.0.1:<port>
/// # let _ = endpoint;
/// # Ok::<(), testkit::Error>(())
/// ```
#[derive(Debug)]
pub struct GrpcProxy {
    bin: PathBuf,
    args: Vec<String>,
    port: u16,
    metrics: u16,
    /// Its clients connect with TLS (`--cert-file`/`--key-file`).
    https: bool,
    running: Option<(Child, Vec<JoinHandle<()>>)>,
    output: Output,
}

impl GrpcProxy {
    /// Starts a proxy of every member of `cluster` (with its TLS files and, when auth is on,
    /// nothing more: grpc-proxy passes each client's token through) and waits until it
    /// serves. Blocking. grpc-proxy refuses a client certificate with a common name ("cert has
    /// non empty Common Name"): give the cluster's [`EtcdTls::client_cert_auth`] one without.
    ///
    /// [`EtcdTls::client_cert_auth`]: crate::EtcdTls::client_cert_auth
    pub fn start(cluster: &EtcdCluster) -> Result<GrpcProxy, Error> {
        Self::launch(cluster, None)
    }

    /// [`start`](Self::start), serving its clients TLS with this certificate and key (PEM;
    /// grpc-proxy's `--cert-file`/`--key-file`): the endpoint is `https://`.
    pub fn start_tls(
        cluster: &EtcdCluster,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Result<GrpcProxy, Error> {
        Self::launch(cluster, Some((cert.into(), key.into())))
    }

    fn launch(
        cluster: &EtcdCluster,
        serve: Option<(PathBuf, PathBuf)>,
    ) -> Result<GrpcProxy, Error> {
        let ports = free_ports(2)?;
        let endpoints: Vec<String> = cluster
            .alive()
            .into_iter()
            .map(|i| cluster.url(i))
            .collect();
        let mut args = vec![
            "grpc-proxy".to_owned(),
            "start".to_owned(),
            format!("--endpoints={}", endpoints.join(",")),
            format!("--listen-addr=127.0.0.1:{}", ports[0]),
            format!("--metrics-addr=http://127.0.0.1:{}", ports[1]),
        ];
        if let Some(tls) = cluster.tls() {
            args.push(format!("--cacert={}", tls.ca.display()));
            if let Some((cert, key)) = &tls.client {
                args.push(format!("--cert={}", cert.display()));
                args.push(format!("--key={}", key.display()));
            }
        }
        let https = serve.is_some();
        if let Some((cert, key)) = serve {
            args.push(format!("--cert-file={}", cert.display()));
            args.push(format!("--key-file={}", key.display()));
        }
        let mut proxy = GrpcProxy {
            bin: cluster.bin().to_path_buf(),
            args,
            port: ports[0],
            metrics: ports[1],
            https,
            running: None,
            output: Output::new(300, &[]),
        };
        proxy.spawn()?;
        Ok(proxy)
    }

    fn spawn(&mut self) -> Result<(), Error> {
        let (child, readers, rx) = spawn_watched(
            Command::new(&self.bin).args(&self.args),
            &self.output,
            READY,
        )?;
        self.running = Some((child, readers));
        if rx.recv_timeout(GUARD).is_err() {
            self.kill9();
            return Err(Error::NotReady {
                what: "etcd grpc-proxy".into(),
                output: self.output.tail(),
            });
        }
        Ok(())
    }

    /// The client URL, `http://127.0.0.1:<port>` (`https://` when started with
    /// [`start_tls`](Self::start_tls)).
    pub fn endpoint(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|(c, _)| c.id())
    }

    /// Its resident memory in KiB (Linux), while running.
    pub fn rss_kib(&self) -> Option<u64> {
        self.pid().and_then(crate::rss_kib)
    }

    /// The Prometheus sample `name` (no labels) from its metrics port.
    pub fn metric(&self, name: &str) -> Result<f64, Error> {
        metric(self.metrics, name)
    }

    /// SIGKILL and reap it. Nothing happens when it is not running.
    pub fn kill9(&mut self) {
        if let Some((mut child, readers)) = self.running.take() {
            let _ = child.kill();
            let _ = child.wait();
            for r in readers {
                let _ = r.join();
            }
        }
    }

    /// [`kill9`](Self::kill9), then start again on the same ports and wait until it serves.
    /// Blocking.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.kill9();
        self.spawn()
    }
}

impl Drop for GrpcProxy {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- etcd grpc-proxy output ---\n{}", self.output.tail());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proxy of a one-member cluster starts, exports metrics, reports its RSS and restarts
    /// on its ports. Skips without etcd.
    #[test]
    fn proxy_starts_serves_metrics_and_restarts() {
        if !crate::etcd_present("testkit::proxy_starts_serves_metrics_and_restarts") {
            return;
        }
        let cluster = EtcdCluster::builder()
            .members(1)
            .start_cluster()
            .expect("etcd starts");
        let mut proxy = GrpcProxy::start(&cluster).expect("proxy starts");
        assert!(proxy.endpoint().starts_with("http://127.0.0.1:"));
        assert!(proxy.metric("go_goroutines").expect("proxy metrics") > 0.0);
        assert!(proxy.rss_kib().is_some());
        let before = proxy.endpoint();
        proxy.restart().expect("proxy restarts");
        assert_eq!(proxy.endpoint(), before);
        assert!(proxy.metric("go_goroutines").expect("proxy metrics") > 0.0);
    }

    /// TLS on both sides: a cluster requiring client certificates (one without a common
    /// name, as grpc-proxy demands) and a proxy serving its clients TLS start, and the
    /// proxy's endpoint is `https://`. Skips without etcd.
    #[test]
    fn tls_proxy_of_a_tls_cluster_starts() {
        if !crate::etcd_present("testkit::proxy::tls_proxy_of_a_tls_cluster_starts") {
            return;
        }
        let pki = crate::Pki::new().expect("certificates");
        let path = |name: &str| pki.path(name);
        let cluster = EtcdCluster::builder()
            .members(1)
            .tls(
                crate::EtcdTls::new(path("ca.pem"), path("server.pem"), path("server.key"))
                    .client_cert_auth(path("client.pem"), path("client.key")),
            )
            .start_cluster()
            .expect("the TLS etcd starts");
        let proxy = GrpcProxy::start_tls(&cluster, path("server.pem"), path("server.key"))
            .expect("the TLS proxy starts");
        assert!(proxy.endpoint().starts_with("https://127.0.0.1:"));
        assert!(proxy.metric("go_goroutines").expect("proxy metrics") > 0.0);
    }
}
