//! Streams made in a provider's own background response (an
//! `openai_responses` upstream with `provider_background`): the provider
//! goes on generating when the gateway's connection to it drops, so an
//! interrupted stream re-attaches to the provider's stream after what the
//! store holds (`GET /responses/{id}?stream=true&starting_after=N`) instead
//! of being continued — no token is generated twice. A client that leaves,
//! or a cancel, must then cancel the provider's response: dropping the
//! connection no longer stops it.
//!
//! [`Track`] watches a run's events as they are numbered: they must come
//! one for one from the provider's stream (the stream's `seq` is the
//! provider's `sequence_number` plus a fixed offset), else the stream is
//! not re-attachable and is continued as any other.

use std::sync::Arc;

use axum::http::HeaderMap;

use super::Relay;
use crate::protocol::responses::provider_numbering;
use crate::stream::Reattach;
use crate::upstream::Upstream;

impl Relay {
    /// Cancel the provider's background response `response` on
    /// `upstream`, in the background (bounded by the upstream's timeouts;
    /// the drain waits for it like any task).
    pub fn cancel_provider_response(
        &self,
        upstream: &Arc<Upstream>,
        response: &str,
        client_headers: &HeaderMap,
    ) {
        let (upstream, response) = (upstream.clone(), response.to_owned());
        let headers = client_headers.clone();
        self.drain.tracker.spawn(async move {
            upstream.cancel_response(&response, &headers).await;
        });
    }
}

/// A run's mapping to the provider's background response.
#[derive(Default)]
pub struct Track {
    /// Known once the run's first event named the response.
    current: Option<Reattach>,
    /// The mapping changed since the store was last told.
    changed: bool,
    /// The events stopped mapping one for one: nothing more to watch.
    broken: bool,
}

impl Track {
    /// A new background request: its first event names the response.
    pub fn new() -> Track {
        Track::default()
    }

    /// A run re-attached to `reattach` (the store has it already).
    pub fn attached(reattach: Reattach) -> Track {
        Track {
            current: Some(reattach),
            changed: false,
            broken: false,
        }
    }

    /// The provider's response, while the run maps to it.
    pub fn response(&self) -> Option<&str> {
        self.current.as_ref().map(|r| r.response.as_str())
    }

    /// One provider event (`name`, `data`, before the gateway stamps it)
    /// numbered `seq`.
    pub fn observe(&mut self, seq: u64, name: Option<&str>, data: &[u8]) {
        if self.broken {
            return;
        }
        let numbering = provider_numbering(name, data);
        let fits = match (&self.current, numbering) {
            (Some(r), Some((n, _))) => n.checked_add(r.offset) == Some(seq),
            (None, Some((n, Some(response)))) => match seq.checked_sub(n) {
                Some(offset) => {
                    self.current = Some(Reattach { response, offset });
                    self.changed = true;
                    true
                }
                None => false,
            },
            _ => false,
        };
        if !fits {
            self.broken = true;
            if self.current.take().is_some() {
                self.changed = true;
            }
        }
    }

    /// What the store should now say, once: `Some(None)` clears it.
    pub fn take_change(&mut self) -> Option<Option<Reattach>> {
        if !std::mem::take(&mut self.changed) {
            return None;
        }
        Some(self.current.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created(seq: u64, id: &str) -> Vec<u8> {
        format!(r#"{{"type":"response.created","sequence_number":{seq},"response":{{"id":"{id}","metadata":{{"sequence_number":99}}}}}}"#).into_bytes()
    }

    fn delta(seq: u64) -> Vec<u8> {
        format!(r#"{{"type":"response.output_text.delta","delta":"\"sequence_number\":7","sequence_number":{seq}}}"#).into_bytes()
    }

    #[test]
    fn maps_a_run_one_for_one_and_says_so_once() {
        let mut t = Track::new();
        t.observe(1, Some("response.created"), &created(0, "resp_up"));
        let want = Reattach {
            response: "resp_up".into(),
            offset: 1,
        };
        assert_eq!(t.take_change(), Some(Some(want.clone())));
        assert_eq!(t.take_change(), None);
        for seq in 2..6 {
            t.observe(seq, Some("response.output_text.delta"), &delta(seq - 1));
        }
        assert_eq!(t.take_change(), None);
        assert_eq!(t.response(), Some("resp_up"));
        assert_eq!(want.starting_after(5), Some(4));
        assert_eq!(want.starting_after(0), None);
    }

    #[test]
    fn a_gap_or_an_unnumbered_event_ends_the_mapping() {
        let mut t = Track::attached(Reattach {
            response: "resp_up".into(),
            offset: 3,
        });
        t.observe(10, None, &delta(7));
        assert_eq!(t.take_change(), None);
        t.observe(11, None, &delta(9));
        assert_eq!(t.take_change(), Some(None));
        assert_eq!(t.response(), None);
        t.observe(12, None, &delta(9));
        assert_eq!(t.take_change(), None);

        let mut t = Track::new();
        t.observe(1, None, br#"{"type":"response.output_text.delta"}"#);
        assert_eq!(t.take_change(), None);
        t.observe(2, Some("response.created"), &created(1, "resp_late"));
        assert_eq!(t.take_change(), None, "a broken run is never mapped again");
    }
}
