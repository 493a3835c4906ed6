//! # vmotion-metrics: the `/metrics` endpoint of vmotion's daemons
//!
//! `vmotion-recv --metrics ADDR` and the key service's `metrics_listen` serve their
//! Prometheus metrics (OpenMetrics text, from the `prometheus-client` crate, re-exported
//! here) over plain HTTP with [`serve`]: one request per connection, at most 8 KiB of
//! request head read within 5 s, at most 16 connections at once, `GET /metrics` answered
//! and anything else 404. Keep it on a management network.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

pub use prometheus_client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The text of `registry` (OpenMetrics, ending in `# EOF`).
pub fn render(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Serves `GET /metrics` on `listener`, with the text `render` gives, for ever.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(16));
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // busy: drop the connection
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut conn)).await;
            let response = match head {
                Ok(Some(line)) if line.starts_with("GET /metrics ") => {
                    let body = render();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; \
                         version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\n\
                         Connection: close\r\n\r\n{body}",
                        body.len()
                    )
                }
                Ok(Some(_)) => {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_owned()
                }
                _ => return,
            };
            let _ =
                tokio::time::timeout(Duration::from_secs(5), conn.write_all(response.as_bytes()))
                    .await;
            let _ = conn.shutdown().await;
        });
    }
}

/// The request line of a request whose head ends within 8 KiB; `None` otherwise.
async fn read_head(conn: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    while len < buf.len() {
        let n = conn.read(&mut buf[len..]).await.ok()?;
        if n == 0 {
            return None;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..len]);
            return head.lines().next().map(str::to_owned);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(request).await.unwrap();
        let mut out = String::new();
        // A refused request may end in a reset: what was read is the answer.
        let _ = c.read_to_string(&mut out).await;
        out
    }

    #[tokio::test]
    async fn metrics_are_served_and_other_paths_are_not() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            Arc::new(|| "x_total 1\n# EOF\n".to_owned()),
        ));
        let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nx_total 1\n# EOF\n"), "{ok}");
        let other = get(addr, b"GET /secrets HTTP/1.1\r\n\r\n").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        // A head that never ends within 8 KiB gets no answer, and frees its slot.
        let endless = get(addr, &[b'a'; 9000]).await;
        assert!(endless.is_empty(), "{endless}");
    }
}
