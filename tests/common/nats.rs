//! A real `nats-server` with JetStream on loopback: a random port (the
//! server picks it, `-p -1`, and writes it to a ports file), a temporary
//! store directory, and SIGKILL / restart on the same port and store.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::DEADLINE;

/// A running (or killed) nats-server.
pub struct NatsServer {
    child: Option<Child>,
    /// Its client port.
    pub port: u16,
    /// Store and ports-file directory (removed on drop).
    pub dir: tempfile::TempDir,
}

fn spawn(port: &str, dir: &std::path::Path) -> Child {
    Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", port, "-sd"])
        .arg(dir.join("store"))
        .arg("--ports_file_dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server is installed (scripts/test.sh installs it)")
}

fn reachable(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

impl NatsServer {
    /// Starts a server on a port of its choosing and waits until it listens.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let child = spawn("-1", dir.path());
        let ports_file: PathBuf = dir.path().join(format!("nats-server_{}.ports", child.id()));
        let start = Instant::now();
        let port = loop {
            if let Ok(text) = std::fs::read_to_string(&ports_file)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(url) = v["nats"][0].as_str()
            {
                break url.rsplit(':').next().unwrap().parse::<u16>().unwrap();
            }
            assert!(start.elapsed() < DEADLINE, "nats-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let me = Self {
            child: Some(child),
            port,
            dir,
        };
        me.wait_reachable().await;
        me
    }

    /// The server's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn wait_reachable(&self) {
        let start = Instant::now();
        while !reachable(self.port) {
            assert!(start.elapsed() < DEADLINE, "nats-server is not reachable");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and store directory.
    pub async fn restart(&mut self) {
        self.kill();
        let start = Instant::now();
        loop {
            let mut c = spawn(&self.port.to_string(), self.dir.path());
            tokio::time::sleep(Duration::from_millis(100)).await;
            match c.try_wait() {
                // The port may linger a moment after the kill: try again.
                Ok(Some(_)) => {
                    assert!(start.elapsed() < DEADLINE, "nats-server did not restart");
                }
                _ => {
                    self.child = Some(c);
                    break;
                }
            }
        }
        self.wait_reachable().await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
