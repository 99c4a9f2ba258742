//! Socket tuning: `TCP_NODELAY` (a heartbeat never waits for Nagle), kernel
//! keep-alive probes at the transport's ping interval, and on Linux
//! `TCP_USER_TIMEOUT`, so a peer that vanished with data unacknowledged is
//! declared dead within the idle timeout instead of the kernel's minutes.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Applies the options to a connected stream.
pub(crate) fn tune(
    stream: &TcpStream,
    keep_alive: Duration,
    idle: Duration,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = SockRef::from(stream);
    let probe = keep_alive.max(Duration::from_secs(1));
    let ka = TcpKeepalive::new().with_time(probe).with_interval(probe);
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "macos"))]
    let ka = ka.with_retries(3);
    sock.set_tcp_keepalive(&ka)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    sock.set_tcp_user_timeout(Some(idle.max(Duration::from_millis(100))))?;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = idle;
    Ok(())
}
