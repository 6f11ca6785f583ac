//! Traces, against a real OTLP/HTTP receiver the test runs on loopback
//! (it decodes the protobuf export with the OpenTelemetry project's own
//! message types): the spans of a stream that failed over and of a resume
//! reach it under the client's trace, and each provider request carried
//! its own span's `traceparent`. Without telemetry the client's
//! `traceparent` passes to the provider untouched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prost::Message;
use serde_json::{Value, json};

use crate::common::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
const RESUME_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const RESUME_SPAN: &str = "b7ad6b7169203331";

/// One span as the receiver got it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    trace: String,
    id: String,
    parent: String,
    name: String,
    error: bool,
    attributes: HashMap<String, String>,
}

/// A minimal OTLP/HTTP traces receiver: `POST /v1/traces` with a protobuf
/// `ExportTraceServiceRequest`; anything else it cannot decode is a 400.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
}

async fn collector() -> Collector {
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let kept = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: Bytes| {
            let kept = kept.clone();
            async move {
                let protobuf = headers
                    .get("content-type")
                    .is_some_and(|v| v == "application/x-protobuf");
                let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                    return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
                };
                if !protobuf {
                    return (axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new());
                }
                for resource in request.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .map(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        for span in scope.spans {
                            kept.lock().unwrap().push(Span {
                                service: service.clone(),
                                trace: hex(&span.trace_id),
                                id: hex(&span.span_id),
                                parent: hex(&span.parent_span_id),
                                name: span.name,
                                error: span.status.is_some_and(|s| s.code == 2),
                                attributes: span
                                    .attributes
                                    .iter()
                                    .map(|kv| {
                                        let value =
                                            kv.value.as_ref().and_then(|v| v.value.as_ref());
                                        (kv.key.clone(), text(value))
                                    })
                                    .collect(),
                            });
                        }
                    }
                }
                (
                    axum::http::StatusCode::OK,
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Collector { url, spans }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&Any>) -> String {
    match value {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

impl Collector {
    /// The spans of `trace` once there are at least `n`.
    async fn trace(&self, trace: &str, n: usize) -> Vec<Span> {
        let found = eventually(Duration::from_secs(15), || async {
            self.of(trace).len() >= n
        })
        .await;
        let spans = self.of(trace);
        assert!(found, "{n} spans of {trace} expected; got {spans:#?}");
        spans
    }

    fn of(&self, trace: &str) -> Vec<Span> {
        let spans = self.spans.lock().unwrap();
        spans.iter().filter(|s| s.trace == trace).cloned().collect()
    }
}

fn pair_config(a: &Mock, b: &Mock, telemetry: &str) -> String {
    let entry = |name: &str, mock: &Mock, weight: u32| {
        format!(
            "[[upstreams]]\nname = \"{name}\"\nbase_url = \"{}\"\nmodels = [\"chat-*\"]\nweight = {weight}\ncontinuation = \"continue_final_message\"\neject_after = 100\n",
            mock.base_url()
        )
    };
    format!(
        "listen = \"127.0.0.1:0\"\n{telemetry}\n[store]\nkind = \"memory\"\n\n{}{}",
        entry("a", a, 1),
        entry("b", b, 0)
    )
}

fn ask(topic: &str) -> Value {
    json!({
        "model": "chat-1",
        "messages": [{"role": "user", "content": format!("tell me about {topic} and tides")}],
        "stream": true,
        "max_tokens": 14,
    })
}

/// The `traceparent` the mock's first request carried (the test's own
/// direct requests come later).
async fn traceparent_seen(mock: &Mock) -> String {
    let requests = mock.requests().await;
    let first = requests.first().expect("a request");
    first["headers"]["traceparent"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_failed_over_stream_and_its_resume_reach_the_collector_under_the_clients_trace() {
    let dir = tempdir();
    let otlp = collector().await;
    let a = Mock::with_args(&dir.join("a"), &["--die-after", "6"]).await;
    let b = Mock::with_args(&dir.join("b"), &[]).await;
    let telemetry = format!(
        "[telemetry]\notlp_endpoint = \"{}/v1/traces\"\nservice_name = \"tidegate-test\"",
        otlp.url
    );
    let gw = Gateway::start_with(
        &dir,
        &pair_config(&a, &b, &telemetry),
        &[],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await;

    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .header("traceparent", format!("00-{TRACE}-{CLIENT_SPAN}-01"))
        .json(&ask("traces"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tidegate-upstream"], "a");
    let id = response.headers()["x-tidegate-stream-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let token = response.headers()["x-tidegate-resume-token"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.text().await.unwrap();
    // The failover is said in-band as a comment, which every SSE parser
    // skips: one answer, exactly the provider's.
    assert_eq!(body.matches(": tidegate-upstream b\n").count(), 1, "{body}");
    let text: String = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            let v: Value = serde_json::from_str(d).ok()?;
            v.pointer("/choices/0/delta/content")?
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, b.answer(&ask("traces")).await);
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");

    // The stream's span and its two provider requests.
    let spans = otlp.trace(TRACE, 3).await;
    let stream = spans
        .iter()
        .find(|s| s.name == "tidegate.stream")
        .unwrap_or_else(|| panic!("{spans:#?}"));
    assert_eq!(stream.parent, CLIENT_SPAN, "under the client's span");
    assert_eq!(stream.service, "tidegate-test");
    assert_eq!(stream.attributes["tidegate.stream_id"], id);
    assert_eq!(stream.attributes["tidegate.end"], "done");
    assert_eq!(stream.attributes["gen_ai.request.model"], "chat-1");
    assert!(!stream.error);
    let mut requests: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "tidegate.upstream")
        .collect();
    requests.sort_by_key(|s| s.attributes["tidegate.attempt"].clone());
    assert_eq!(requests.len(), 2, "{spans:#?}");
    let (first, failover) = (requests[0], requests[1]);
    for span in [first, failover] {
        assert_eq!(span.parent, stream.id);
        assert_eq!(span.attributes["tidegate.stream_id"], id);
    }
    assert_eq!(first.attributes["tidegate.upstream"], "a");
    assert_eq!(first.attributes["tidegate.reason"], "first");
    assert!(first.error, "the request that died mid-answer");
    assert_eq!(failover.attributes["tidegate.upstream"], "b");
    assert_eq!(failover.attributes["tidegate.reason"], "failover");
    assert!(!failover.error);
    // Each provider saw its own request's span as the parent.
    assert_eq!(
        traceparent_seen(&a).await,
        format!("00-{TRACE}-{}-01", first.id)
    );
    assert_eq!(
        traceparent_seen(&b).await,
        format!("00-{TRACE}-{}-01", failover.id)
    );

    // A resume, under the trace its request names.
    let mut replay = Sse::get(
        &gw.url(&format!("/v1/streams/{id}")),
        &[
            ("x-tidegate-resume-token", token.as_str()),
            (
                "traceparent",
                &format!("00-{RESUME_TRACE}-{RESUME_SPAN}-01"),
            ),
        ],
    )
    .await;
    assert_eq!(replay.status, 200);
    assert!(replay.rest().await.last().is_some_and(SseEvent::is_done));
    let spans = otlp.trace(RESUME_TRACE, 1).await;
    assert_eq!(spans[0].name, "tidegate.resume");
    assert_eq!(spans[0].parent, RESUME_SPAN);
    assert_eq!(spans[0].attributes["tidegate.stream_id"], id);
}

#[tokio::test]
async fn without_telemetry_the_clients_traceparent_reaches_the_provider_untouched() {
    let dir = tempdir();
    let a = Mock::with_args(&dir.join("a"), &[]).await;
    let b = Mock::with_args(&dir.join("b"), &[]).await;
    let gw = Gateway::start(&dir, &pair_config(&a, &b, "")).await;
    let parent = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    let mut sse = Sse::from(
        client()
            .post(gw.url("/v1/chat/completions"))
            .header("traceparent", &parent)
            .json(&ask("no traces"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(sse.rest().await.last().is_some_and(SseEvent::is_done));
    assert_eq!(traceparent_seen(&a).await, parent);
}

#[tokio::test]
async fn a_continuation_is_traced_under_the_resume_that_started_it() {
    let dir = tempdir();
    let otlp = collector().await;
    let mock = Mock::start(&dir).await;
    let telemetry = format!("[telemetry]\notlp_endpoint = \"{}/v1/traces\"", otlp.url);
    let gw = Gateway::start_with(
        &dir,
        &config(&mock, "127.0.0.1:0", "kind = \"memory\"", &telemetry),
        &[],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await;
    let mut request = chat(12, 0, "cut and continued");
    request["mock"]["cut_after_events"] = json!(5);
    request["mock"]["fail_id"] = json!("traced-cut");
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &request).await;
    let (id, token) = (
        sse.header("x-tidegate-stream-id"),
        sse.header("x-tidegate-resume-token"),
    );
    let mut events = sse.rest().await;
    let abort = events.last().and_then(SseEvent::error).expect("cut");
    assert_eq!(abort["resume"], true, "{abort}");
    let last = ids_of(&events).last().copied().unwrap_or(0).to_string();
    events.pop();
    let parent = format!("00-{RESUME_TRACE}-{RESUME_SPAN}-01");
    let mut resumed = Sse::get(
        &gw.url(&format!("/v1/streams/{id}")),
        &[
            ("x-tidegate-resume-token", token.as_str()),
            ("last-event-id", last.as_str()),
            ("traceparent", parent.as_str()),
        ],
    )
    .await;
    events.extend(resumed.rest().await);
    assert!(events.last().is_some_and(SseEvent::is_done), "{events:?}");
    assert_eq!(text_of(&events), mock.answer(&request).await);

    let spans = otlp.trace(RESUME_TRACE, 3).await;
    let find = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} in {spans:#?}"))
    };
    let (resume, run, request) = (
        find("tidegate.resume"),
        find("tidegate.continuation"),
        find("tidegate.upstream"),
    );
    assert_eq!(resume.parent, RESUME_SPAN);
    assert_eq!(
        run.parent, resume.id,
        "the continuation hangs under the resume"
    );
    assert_eq!(request.parent, run.id);
    assert_eq!(request.attributes["tidegate.reason"], "continuation");
    assert_eq!(run.attributes["tidegate.end"], "done");
    for span in [resume, run, request] {
        assert_eq!(span.attributes["tidegate.stream_id"], id);
    }
}
