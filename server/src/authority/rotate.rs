//! The rotation task: follows the schedule for the X.509 CA and the JWT
//! key, and republishes the bundle after every change.
//!
//! It sleeps until the schedule's next point, but never longer than
//! [`MAX_SLEEP`], because the server's clock is injected (and may jump)
//! while the sleep is real time; a manual change (admin API) wakes it too.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;

use crate::state::{ChangeEvent, ServerState};

/// The longest the task sleeps between two looks at the schedule.
pub const MAX_SLEEP: Duration = Duration::from_secs(2);
/// The wait after a failed pass.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Runs the schedule until `shutdown` turns true.
pub async fn run(state: Arc<ServerState>, mut shutdown: watch::Receiver<bool>) {
    let mut events = state.subscribe();
    loop {
        let s = Arc::clone(&state);
        let wait = match tokio::task::spawn_blocking(move || s.rotate_authorities()).await {
            Ok(Ok(next)) => Duration::try_from(next - state.now())
                .unwrap_or(Duration::ZERO)
                .min(MAX_SLEEP),
            Ok(Err(e)) => {
                tracing::error!(error = %e, retry_in_secs = RETRY_AFTER.as_secs(), "authority rotation failed");
                RETRY_AFTER
            }
            Err(e) => {
                tracing::error!(error = %e, "authority rotation task failed");
                RETRY_AFTER
            }
        };
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return,
                () = &mut sleep => break,
                ev = events.recv() => match ev {
                    Ok(ChangeEvent::Bundle) | Err(RecvError::Lagged(_)) => break,
                    Ok(_) => {}
                    Err(RecvError::Closed) => return,
                },
            }
        }
    }
}
