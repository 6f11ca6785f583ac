//! The wire protocols tidegate speaks, one file each, behind one trait.
//!
//! Everything the gateway must know about a protocol's bytes lives here,
//! and nothing else: which URL path it posts to, how its requests are
//! checked, how its credential is sent, which event ends its stream, how a
//! partial answer is read back from the stored events and continued, and
//! how its end, abort and error bodies are framed. Pure code, no I/O.
//!
//! - [`openai`]: OpenAI chat completions (`POST /v1/chat/completions`), and
//!   every server that speaks it (vLLM, SGLang, Ollama, llama.cpp, DeepSeek);
//! - [`anthropic`]: Anthropic Messages (`POST /v1/messages`);
//! - [`responses`]: OpenAI Responses (`POST /v1/responses`);
//! - [`sse`]: `text/event-stream` decoding and framing, shared by all;
//! - [`request`]: reading the few request fields the gateway checks;
//! - [`continuation`]: what all protocols share when an answer is continued.
//!
//! Adding a protocol is adding a file with a [`Wire`] implementation, a
//! variant of [`Protocol`], and its arm in [`Protocol::wire`].

pub mod anthropic;
pub mod continuation;
pub mod openai;
pub mod request;
pub mod responses;
pub mod sse;

use axum::http::{HeaderName, HeaderValue};
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::Value;

pub use continuation::{Hold, Leg, Partial, Plan, Splice};
pub use request::{RequestError, Summary};
use sse::SseEvent;

use crate::stream::Event;

/// Which wire protocol a route, an upstream or a stored stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    #[serde(rename = "openai")]
    OpenAi,
    #[serde(rename = "anthropic")]
    Anthropic,
    #[serde(rename = "openai_responses")]
    OpenAiResponses,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [
        Protocol::OpenAi,
        Protocol::Anthropic,
        Protocol::OpenAiResponses,
    ];

    /// What this protocol's bytes mean.
    pub fn wire(self) -> &'static dyn Wire {
        match self {
            Protocol::OpenAi => &openai::OpenAiChat,
            Protocol::Anthropic => &anthropic::AnthropicMessages,
            Protocol::OpenAiResponses => &responses::OpenAiResponses,
        }
    }

    /// The name in config files and stream records.
    pub fn as_str(self) -> &'static str {
        self.wire().name()
    }

    /// The provider whose API it is: OpenAI's chat completions and
    /// Responses are one family (a model routed to one has the other beside
    /// it).
    pub fn family(self) -> &'static str {
        match self {
            Protocol::OpenAi | Protocol::OpenAiResponses => "openai",
            Protocol::Anthropic => "anthropic",
        }
    }

    pub fn parse(name: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

/// How an upstream continues a partial answer (`continuation` in config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Continuation {
    /// vLLM / SGLang: `continue_final_message: true` on a trailing
    /// assistant message.
    ContinueFinalMessage,
    /// DeepSeek (beta) and compatibles: `prefix: true` on it.
    Prefix,
    /// Anthropic (models before Claude 4.6) and servers that continue a
    /// trailing assistant message.
    AssistantPrefix,
    /// Re-ask with the partial answer as the assistant's turn and a user
    /// turn asking to continue exactly where it stopped; the gateway trims
    /// what the model repeats at the splice. Every chat model takes it
    /// (OpenAI, Claude 4.6+); best-effort, not exact.
    Instruct,
    /// The provider cannot continue: a resume replays, then ends.
    None,
}

impl Continuation {
    pub const ALL: [Continuation; 5] = [
        Continuation::ContinueFinalMessage,
        Continuation::Prefix,
        Continuation::AssistantPrefix,
        Continuation::Instruct,
        Continuation::None,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Continuation::ContinueFinalMessage => "continue_final_message",
            Continuation::Prefix => "prefix",
            Continuation::AssistantPrefix => "assistant_prefix",
            Continuation::Instruct => "instruct",
            Continuation::None => "none",
        }
    }
}

/// Whether a request body declares tools (so its answer may call one).
pub fn declares_tools(request: &Value) -> bool {
    ["tools", "functions"].iter().any(|k| {
        request
            .get(k)
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
    })
}

/// An error a provider sent inside its stream (Anthropic `event: error`,
/// an OpenAI chunk that is an `error` object): the stream failed there.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderError {
    pub message: String,
    /// Whether asking again may succeed (overloaded, a server error), as
    /// opposed to a request the provider refuses.
    pub resumable: bool,
}

/// An event after which the provider's stream is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terminal {
    /// A marker that is not an answer event (OpenAI's `data: [DONE]`):
    /// not relayed; the gateway frames the end itself.
    Sentinel,
    /// The answer's own last event (Anthropic's `message_stop`): relayed,
    /// and then the stream is over.
    Last,
}

/// One wire protocol. Implementations are unit structs: all they know is
/// the protocol, none of them holds state.
pub trait Wire: Sync {
    /// The protocol's name in config files and stream records.
    fn name(&self) -> &'static str;

    /// The path, under an upstream's `base_url`, that streams are posted to.
    fn path(&self) -> &'static str;

    /// Check a client's request body: the fields the gateway needs, in the
    /// shapes the provider would demand.
    fn validate<'a>(&self, body: &'a [u8]) -> Result<Summary<'a>, RequestError>;

    /// The header a configured key travels in, and its value.
    fn credential(&self, key: &str) -> (HeaderName, String);

    /// Headers the provider requires, sent when the client did not send them.
    fn required_headers(&self) -> &'static [(HeaderName, HeaderValue)] {
        &[]
    }

    /// Whether the provider's stream is over after `event`.
    fn terminal(&self, event: &SseEvent) -> Option<Terminal>;

    /// An error the provider sent in its stream, which ends it there (never
    /// relayed or stored as an answer event).
    fn provider_error(&self, event: &SseEvent) -> Option<ProviderError>;

    /// A new stream's hold: what must reach the client only whole (tool
    /// calls). Only a request that declares tools gets one: no other can be
    /// answered with a tool call, so no other stream is searched for one.
    fn hold(&self) -> Box<dyn Hold>;

    /// Read what was already said back from the stored events, as the
    /// provider's SDK would accumulate it.
    fn partial(&self, events: &[Event]) -> Partial;

    /// The requests that continue `partial` in `style`, or why there are
    /// none.
    fn continuation(&self, original: &Value, style: Continuation, partial: &Partial) -> Plan;

    /// The events that end an answer whose continuation has nothing left
    /// to generate but whose stored events do not end it (a provider cut
    /// right before its last event; a budget spent with no finish said).
    fn closing(&self, partial: &Partial) -> Vec<continuation::Out>;

    /// Frame the end of a finished stream (nothing, where the answer's
    /// last event says it).
    fn write_done(&self, out: &mut BytesMut);

    /// Frame an in-band abort event carrying `error` (tidegate's abort
    /// object) in the protocol's own error shape.
    fn write_abort(&self, out: &mut BytesMut, error: Value);

    /// An error response body in the protocol's shape.
    fn error_body(&self, kind: &str, code: &str, message: &str) -> Value;

    /// Whether a provider's error body is already in the protocol's shape
    /// (then it is passed to the client as it is).
    fn is_error_body(&self, body: &Value) -> bool;

    /// The message of a provider's error body in this protocol's shape.
    fn error_message(&self, body: &Value) -> Option<String>;

    /// Whether events are rewritten once numbered ([`stamp`](Self::stamp)):
    /// checked once per run, so other protocols pay nothing per event.
    fn stamps(&self) -> bool {
        false
    }

    /// Event `seq` (named `name`) of stream `to.id` as its clients see it
    /// (OpenAI Responses: numbered `seq - 1`, its response named `to.id`
    /// and in the background mode its client asked for).
    fn stamp(&self, _to: &Stamp<'_>, _seq: u64, _name: Option<&str>, data: Bytes) -> Bytes {
        data
    }
}

/// What a stream's events are stamped with ([`Wire::stamp`]).
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    /// The stream's id, which names its response.
    pub id: &'a str,
    /// The client asked for a background response (whatever the provider
    /// was asked: tidegate runs a background response itself, and an
    /// upstream with `provider_background` is asked for one of its own).
    pub background: bool,
}

/// The header a client names its conversation with, so that routing keeps
/// it on one upstream of a group.
pub const ROUTE_KEY_HEADER: &str = "x-tidegate-route-key";

/// A request's route key: the `x-tidegate-route-key` header, else the
/// body's end-user id (OpenAI's `user`, Anthropic's `metadata.user_id`).
/// At most 256 bytes count.
pub fn route_key(headers: &axum::http::HeaderMap, body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Meta<'a> {
        #[serde(borrow)]
        user_id: Option<std::borrow::Cow<'a, str>>,
    }
    #[derive(serde::Deserialize)]
    struct Keyed<'a> {
        #[serde(borrow)]
        user: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow)]
        metadata: Option<Meta<'a>>,
    }
    let cut = |k: &str| {
        let mut end = k.len().min(256);
        while !k.is_char_boundary(end) {
            end -= 1;
        }
        k[..end].to_owned()
    };
    if let Some(v) = headers.get(ROUTE_KEY_HEADER).and_then(|v| v.to_str().ok())
        && !v.is_empty()
    {
        return Some(cut(v));
    }
    let keyed: Keyed = serde_json::from_slice(body).ok()?;
    keyed
        .user
        .or(keyed.metadata.and_then(|m| m.user_id))
        .filter(|k| !k.is_empty())
        .map(|k| cut(&k))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn event(name: Option<&'static str>, data: &'static str) -> SseEvent {
        SseEvent {
            name: name.map(|n| Bytes::from_static(n.as_bytes())),
            data: Bytes::from_static(data.as_bytes()),
        }
    }

    #[test]
    fn each_protocol_knows_its_end_and_its_in_band_errors() {
        let openai = Protocol::OpenAi.wire();
        assert_eq!(
            openai.terminal(&event(None, "[DONE]")),
            Some(Terminal::Sentinel)
        );
        assert_eq!(openai.terminal(&event(None, "{\"id\":\"c\"}")), None);
        let error = openai
            .provider_error(&event(
                None,
                r#"{"error":{"message":"boom","type":"server_error"}}"#,
            ))
            .unwrap();
        assert_eq!((error.message.as_str(), error.resumable), ("boom", true));
        assert!(
            openai
                .provider_error(&event(None, r#"{"id":"c","choices":[]}"#))
                .is_none()
        );
        let anthropic = Protocol::Anthropic.wire();
        let stop = event(Some("message_stop"), "{\"type\":\"message_stop\"}");
        assert_eq!(anthropic.terminal(&stop), Some(Terminal::Last));
        assert_eq!(anthropic.terminal(&event(None, "[DONE]")), None);
        let error = anthropic
            .provider_error(&event(
                Some("error"),
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            ))
            .unwrap();
        assert_eq!(
            (error.message.as_str(), error.resumable),
            ("Overloaded", true)
        );
        assert!(
            anthropic
                .provider_error(&event(Some("ping"), "{}"))
                .is_none()
        );
    }

    #[test]
    fn error_bodies_are_in_each_protocols_shape() {
        for protocol in Protocol::ALL {
            let wire = protocol.wire();
            let body = wire.error_body("invalid_request_error", "invalid_json", "bad");
            assert!(wire.is_error_body(&body), "{protocol:?}: {body}");
        }
        let openai = Protocol::OpenAi.wire().error_body("k", "c", "m");
        assert_eq!(openai["error"]["code"], "c");
        let anthropic = Protocol::Anthropic.wire().error_body("k", "c", "m");
        assert_eq!(anthropic["error"]["type"], "k");
        assert!(!Protocol::OpenAi.wire().is_error_body(&anthropic["error"]));
        assert!(!Protocol::Anthropic.wire().is_error_body(&openai));
    }

    #[test]
    fn each_protocol_checks_its_requests() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"q"}],"stream":true}"#;
        let summary = Protocol::OpenAi.wire().validate(body).unwrap();
        assert_eq!((summary.model.as_ref(), summary.stream), ("m", true));
        // Anthropic demands max_tokens.
        let err = Protocol::Anthropic.wire().validate(body).unwrap_err();
        assert!(err.to_string().contains("max_tokens"), "{err}");
        let body = br#"{"model":"m","messages":[{"role":"user","content":"q"}],"max_tokens":9}"#;
        let summary = Protocol::Anthropic.wire().validate(body).unwrap();
        assert!(!summary.stream);
        for protocol in Protocol::ALL {
            let wire = protocol.wire();
            assert!(matches!(
                wire.validate(b"{"),
                Err(RequestError::Malformed(_))
            ));
            assert!(wire.validate(br#"{"model":"","messages":[1]}"#).is_err());
            assert!(wire.validate(br#"{"model":"m","messages":[]}"#).is_err());
        }
    }

    #[test]
    fn names_round_trip() {
        for protocol in Protocol::ALL {
            assert_eq!(Protocol::parse(protocol.as_str()), Some(protocol));
        }
        assert_eq!(Protocol::parse("grpc"), None);
    }
}
