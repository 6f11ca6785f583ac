//! Following a run that another replica holds (shared store): what it
//! writes to the store is published to a [`LiveStream`] here as it lands,
//! until the record says the run is over. Nothing is written and no
//! provider is called; the runner's lease makes sure of that.

use std::sync::Arc;
use std::time::Duration;

use super::Relay;
use super::live::LiveStream;
use crate::stream::{AbortKind, End, Status};

/// How long one wait for the runner's next events lasts before the record
/// is checked again.
const WAIT: Duration = Duration::from_millis(250);

/// Feed `live` from the store until the remote run ends.
pub async fn follow(live: Arc<LiveStream>, relay: Arc<Relay>) {
    let store = &relay.store;
    let id = live.who.id.clone();
    let mut last = live.base;
    let end = loop {
        let batch = tokio::select! {
            biased;
            _ = live.token.cancelled() => break End::Abort(live.cancel_reason()),
            r = store.follow(&id, last, WAIT) => r,
        };
        match batch {
            Err(e) => {
                tracing::error!(stream = %id, error = %e, "following a remote stream failed");
                break End::Abort(AbortKind::StoreFailed);
            }
            Ok(events) if !events.is_empty() => {
                last = events.last().map_or(last, |e| e.seq);
                live.push(events);
                continue;
            }
            Ok(_) => {}
        }
        let record = match store.get(&id).await {
            Ok(Some(r)) => r,
            Ok(None) => break End::Abort(AbortKind::Incomplete),
            Err(_) => break End::Abort(AbortKind::StoreFailed),
        };
        if record.status == Status::Running {
            match store.lease_alive(&id).await {
                Ok(true) => continue,
                // The runner died without a word: resume to continue.
                Ok(false) => {}
                Err(_) => break End::Abort(AbortKind::StoreFailed),
            }
        }
        let end = record.status.end_after_replay(record.reason.as_deref());
        // Whatever landed between the last read and the status change.
        match store.events_after(&id, last).await {
            Ok(events) => live.push(events),
            Err(_) => break End::Abort(AbortKind::StoreFailed),
        }
        break end;
    };
    relay.registry.remove(&live);
    live.finish(end);
}
