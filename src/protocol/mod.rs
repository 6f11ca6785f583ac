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
pub mod sse;

use axum::http::{HeaderName, HeaderValue};
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::Value;

pub use continuation::{Partial, Plan};
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
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::OpenAi, Protocol::Anthropic];

    /// What this protocol's bytes mean.
    pub fn wire(self) -> &'static dyn Wire {
        match self {
            Protocol::OpenAi => &openai::OpenAiChat,
            Protocol::Anthropic => &anthropic::AnthropicMessages,
        }
    }

    /// The name in config files and stream records.
    pub fn as_str(self) -> &'static str {
        self.wire().name()
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
    /// Anthropic and servers that continue a trailing assistant message.
    AssistantPrefix,
    /// The provider cannot continue: a resume replays, then ends.
    None,
}

impl Continuation {
    pub const ALL: [Continuation; 4] = [
        Continuation::ContinueFinalMessage,
        Continuation::Prefix,
        Continuation::AssistantPrefix,
        Continuation::None,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Continuation::ContinueFinalMessage => "continue_final_message",
            Continuation::Prefix => "prefix",
            Continuation::AssistantPrefix => "assistant_prefix",
            Continuation::None => "none",
        }
    }
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

    /// What the client already holds from the original run and must not
    /// see again from a continuation (Anthropic's message and block openers).
    fn skip_in_continuation(&self, event: &SseEvent) -> bool;

    /// Make a continued event read as part of the original answer (the
    /// original's chunk id).
    fn rewrite_continued(&self, data: Bytes, chunk_id: Option<&str>) -> Bytes;

    /// Read what was already said back from the stored events.
    fn partial(&self, events: &[Event]) -> Partial;

    /// The request that continues `partial` in `style`, or why there is none.
    fn continuation(&self, original: &Value, style: Continuation, partial: &Partial) -> Plan;

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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: Option<&'static str>, data: &'static str) -> SseEvent {
        SseEvent {
            name: name.map(|n| Bytes::from_static(n.as_bytes())),
            data: Bytes::from_static(data.as_bytes()),
        }
    }

    #[test]
    fn each_protocol_knows_its_end_and_what_a_continuation_skips() {
        let openai = Protocol::OpenAi.wire();
        assert_eq!(
            openai.terminal(&event(None, "[DONE]")),
            Some(Terminal::Sentinel)
        );
        assert_eq!(openai.terminal(&event(None, "{\"id\":\"c\"}")), None);
        assert!(!openai.skip_in_continuation(&event(None, "{}")));
        let anthropic = Protocol::Anthropic.wire();
        let stop = event(Some("message_stop"), "{\"type\":\"message_stop\"}");
        assert_eq!(anthropic.terminal(&stop), Some(Terminal::Last));
        assert_eq!(anthropic.terminal(&event(None, "[DONE]")), None);
        for name in ["message_start", "content_block_start", "ping"] {
            assert!(
                anthropic.skip_in_continuation(&event(Some(name), "{}")),
                "{name}"
            );
        }
        assert!(!anthropic.skip_in_continuation(&event(Some("content_block_delta"), "{}")));
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
