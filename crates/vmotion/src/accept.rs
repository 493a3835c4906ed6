//! Where a destination's data connections come from: its own listener, or
//! [`Receiver::serve`](crate::Receiver::serve)'s routing, shared by guests and tunnels.

use std::time::Duration;

use vmotion_proto::WireFrame;

use crate::error::MigrateError;
use crate::transport::{Accept, Conn, Peer};
use crate::wire::read_frame;

/// How long a new connection may take to send its first frame (its `Hello` or
/// `StreamBind`) before it is dropped.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(5);

/// The first frame of a new connection within [`FIRST_FRAME_TIMEOUT`]; `None` when it
/// sent none (closed, failed or stayed silent).
pub(crate) async fn first_frame(conn: &mut Conn) -> Option<WireFrame> {
    match tokio::time::timeout(FIRST_FRAME_TIMEOUT, read_frame(conn, 4096)).await {
        Ok(Ok(Some(f))) => Some(f),
        _ => None,
    }
}

/// Where a migration's data connections come from.
pub(crate) enum DataSource<'a, L> {
    /// Accepted from the listener (one migration per `receive`).
    Listener(&'a L),
    /// Routed here by [`Receiver::serve`](crate::Receiver::serve), their first frame
    /// already read.
    Routed(tokio::sync::mpsc::Receiver<(Conn, WireFrame, Peer)>),
}

impl<L: Accept> DataSource<'_, L> {
    /// The next data connection, with its first frame when it was routed here, by
    /// `deadline` (`patience` is what a timeout reports).
    pub(crate) async fn next(
        &mut self,
        deadline: tokio::time::Instant,
        patience: Duration,
    ) -> Result<(Conn, Option<WireFrame>, Peer), MigrateError> {
        let late = || MigrateError::Timeout {
            waiting_for: "the data connections",
            after: patience,
        };
        match self {
            Self::Listener(l) => {
                let (tcp, peer) = tokio::time::timeout_at(deadline, l.accept_conn())
                    .await
                    .map_err(|_| late())??;
                Ok((tcp, None, peer))
            }
            Self::Routed(rx) => {
                let (tcp, first, peer) = tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .map_err(|_| late())?
                    .ok_or_else(late)?;
                Ok((tcp, Some(first), peer))
            }
        }
    }
}
