//! The OpenAI Responses API against the real binary: a background response
//! finished with no client by the process that restarts after a SIGKILL and
//! by the surviving replica on one real Redis, cancel from either replica,
//! an idempotent create, and the strict refusals. The mock demands a key,
//! as OpenAI does, and the gateway carries its own (`api_key_env`): a
//! response generated with no client attached can only use the gateway's.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;
use crate::replicas::{Redis, SECRET, redis_config};

/// The provider key: the mock demands it, the gateway has it in its env.
const PROVIDER: (&str, &str) = ("MOCK_PROVIDER_KEY", "sk-provider-responses");

/// The mock, demanding [`PROVIDER`]'s key.
async fn mock(dir: &std::path::Path) -> Mock {
    Mock::with_key(dir, PROVIDER.1).await
}

/// The Responses upstream beside the chat one `config` writes.
fn with_responses(mock: &Mock, config: String) -> String {
    format!(
        "{config}\n[[upstreams]]\nname = \"mock-responses\"\nprotocol = \"openai_responses\"\nbase_url = \"{}\"\nmodels = [\"*\"]\napi_key_env = \"{}\"\ncontinuation = \"instruct\"\nfirst_byte_timeout = \"2s\"\nidle_timeout = \"1s\"\n",
        mock.base_url(),
        PROVIDER.0
    )
}

fn redis_replica_config(mock: &Mock, redis: &Redis) -> String {
    with_responses(mock, redis_config(mock, 0, redis))
}

fn request(topic: &str, words: u64, interval_ms: u64) -> Value {
    json!({
        "model": "mock",
        "input": format!("tell me about tides and gates: {topic}"),
        "max_output_tokens": 400,
        "mock": {"words": words, "token_interval_ms": interval_ms},
    })
}

fn output_text(response: &Value) -> String {
    response["output"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["type"] == "message")
        .flat_map(|i| i["content"].as_array().cloned().unwrap_or_default())
        .filter(|p| p["type"] == "output_text")
        .filter_map(|p| p["text"].as_str().map(str::to_owned))
        .collect()
}

async fn create(url: &str, body: &Value, key: Option<&str>) -> reqwest::Response {
    let mut r = client().post(url).bearer_auth("sk-test").json(body);
    if let Some(key) = key {
        r = r.header("idempotency-key", key);
    }
    r.send().await.unwrap()
}

async fn retrieve(gw: &Gateway, id: &str) -> Value {
    client()
        .get(gw.url(&format!("/v1/responses/{id}")))
        .bearer_auth("sk-test")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_cancel_on_either_replica_drops_the_providers_generation() {
    let dir = tempdir();
    let mock = mock(&dir).await;
    let redis = Redis::start(&dir).await;
    let cfg = redis_replica_config(&mock, &redis);
    let a = Gateway::start_with(&dir, &cfg, &[], &[SECRET, PROVIDER]).await;
    let b = Gateway::start_with(&dir, &cfg, &[], &[SECRET, PROVIDER]).await;
    let mut req = request("cancel", 400, 40);
    req["background"] = json!(true);
    let cancelled = mock.stat("requests_cancelled").await;
    let created: Value = create(&a.url("/v1/responses"), &req, None)
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let going = eventually(Duration::from_secs(10), || async {
        !output_text(&retrieve(&b, &id).await).is_empty()
    })
    .await;
    assert!(going);
    // Another key cannot cancel it.
    let other = client()
        .post(b.url(&format!("/v1/responses/{id}/cancel")))
        .bearer_auth("sk-other")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    let out: Value = client()
        .post(b.url(&format!("/v1/responses/{id}/cancel")))
        .bearer_auth("sk-test")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        ["cancelled", "in_progress"].contains(&out["status"].as_str().unwrap()),
        "{out}"
    );
    let dropped = eventually(Duration::from_secs(10), || async {
        mock.stat("requests_cancelled").await > cancelled
    })
    .await;
    assert!(dropped, "the provider's generation went on");
    let over = eventually(Duration::from_secs(10), || async {
        retrieve(&a, &id).await["status"] == "cancelled"
    })
    .await;
    assert!(over, "{}", retrieve(&a, &id).await);
}

#[tokio::test]
async fn a_retried_background_create_starts_no_second_generation() {
    let dir = tempdir();
    let mock = mock(&dir).await;
    let gw = Gateway::start_with(
        &dir,
        &with_responses(&mock, config(&mock, "127.0.0.1:0", &embedded(&dir), "")),
        &[],
        &[PROVIDER],
    )
    .await;
    let mut req = request("idempotent", 20, 10);
    req["background"] = json!(true);
    let started = mock.stat("requests_started").await;
    let url = gw.url("/v1/responses");
    let first: Value = create(&url, &req, Some("k-1")).await.json().await.unwrap();
    let again: Value = create(&url, &req, Some("k-1")).await.json().await.unwrap();
    assert_eq!(first["id"], again["id"], "{first} {again}");
    let id = first["id"].as_str().unwrap().to_owned();
    let done = eventually(Duration::from_secs(10), || async {
        retrieve(&gw, &id).await["status"] == "completed"
    })
    .await;
    assert!(done);
    assert_eq!(mock.stat("requests_started").await - started, 1);
}

#[tokio::test]
async fn bad_requests_get_the_responses_apis_own_errors() {
    let dir = tempdir();
    let mock = mock(&dir).await;
    let gw = Gateway::start_with(
        &dir,
        &with_responses(&mock, config(&mock, "127.0.0.1:0", &embedded(&dir), "")),
        &[],
        &[PROVIDER],
    )
    .await;
    let url = gw.url("/v1/responses");
    for (body, needle) in [
        (json!({"model": "mock", "stream": true}), "input"),
        (
            json!({"model": "mock", "input": "", "stream": true}),
            "input",
        ),
        (json!({"input": "q", "stream": true}), "model"),
        (
            json!({"model": "mock", "input": "q", "background": "yes"}),
            "background",
        ),
    ] {
        let r = create(&url, &body, None).await;
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{v}"
        );
    }
    // The provider's own refusal reaches the client in its shape.
    let r = create(
        &url,
        &json!({"model": "mock", "input": "q", "max_tokens": 20, "stream": true}),
        None,
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unknown_parameter", "{v}");
    // An unknown response, a bad cursor.
    let r = client()
        .get(gw.url("/v1/responses/resp_nope?stream=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = client()
        .get(gw.url("/v1/responses/resp_nope?stream=true&starting_after=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

/// The mock's whole answer to `request`, asked directly without pacing.
async fn exact(mock: &Mock, request: &Value) -> String {
    let mut body = request.clone();
    body["stream"] = json!(false);
    body["background"] = json!(false);
    body["mock"]
        .as_object_mut()
        .unwrap()
        .remove("token_interval_ms");
    let v: Value = client()
        .post(format!("{}/responses", mock.base_url()))
        .bearer_auth(PROVIDER.1)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = output_text(&v);
    assert!(!text.is_empty(), "the mock answered {v}");
    text
}

/// Create a background response on `from`, see it generating, SIGKILL
/// `from`, and see `survivor` finish it with no client: the exact answer,
/// one provider call plus one continuation, its events numbered 0, 1, ….
async fn survives_a_sigkill(mock: &Mock, from: &mut Gateway, survivor: impl AsyncFn() -> Gateway) {
    let mut req = request("background", 60, 40);
    req["background"] = json!(true);
    let want = exact(mock, &req).await;
    let started = mock.stat("requests_started").await;
    let r = create(&from.url("/v1/responses"), &req, None).await;
    assert_eq!(r.status(), 200);
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["status"], "queued", "{created}");
    assert_eq!(created["background"], true);
    let id = created["id"].as_str().unwrap().to_owned();
    let going = eventually(Duration::from_secs(10), || async {
        let v = retrieve(from, &id).await;
        v["status"] == "in_progress" && !output_text(&v).is_empty()
    })
    .await;
    assert!(going, "the background response did not start");
    from.proc.kill().await;
    let gw = survivor().await;
    let done = eventually(Duration::from_secs(30), || async {
        retrieve(&gw, &id).await["status"] == "completed"
    })
    .await;
    let v = retrieve(&gw, &id).await;
    assert!(done, "not completed: {v}");
    assert_eq!(output_text(&v), want);
    assert_eq!(
        mock.stat("requests_started").await - started,
        2,
        "one call and one continuation for the one interruption"
    );
    // Its events replay whole, numbered from 0, and spell the answer.
    let mut sse = Sse::get(
        &gw.url(&format!("/v1/responses/{id}?stream=true")),
        &[("authorization", "Bearer sk-test")],
    )
    .await;
    let events = sse.rest().await;
    assert_whole(&events, &want);
}

/// A response's events, whole: numbered 0, 1, … once each, spelling
/// `want`, ending in `response.completed`.
fn assert_whole(events: &[SseEvent], want: &str) {
    let numbers: Vec<u64> = events
        .iter()
        .map(|e| e.json()["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (0..numbers.len() as u64).collect::<Vec<_>>());
    assert_eq!(deltas(events), want);
    assert_eq!(
        events.last().unwrap().json()["type"],
        "response.completed",
        "{events:?}"
    );
}

#[tokio::test]
async fn a_background_response_is_finished_by_the_surviving_replica() {
    let dir = tempdir();
    let mock = mock(&dir).await;
    let redis = Redis::start(&dir).await;
    let cfg = redis_replica_config(&mock, &redis);
    let mut a = Gateway::start_with(&dir, &cfg, &[], &[SECRET, PROVIDER]).await;
    let b = Gateway::start_with(&dir, &cfg, &[], &[SECRET, PROVIDER]).await;
    let b = std::cell::Cell::new(Some(b));
    survives_a_sigkill(&mock, &mut a, async || b.take().unwrap()).await;
}

#[tokio::test]
async fn a_background_response_is_finished_by_the_restarted_process() {
    let dir = tempdir();
    let mock = mock(&dir).await;
    let cfg = with_responses(
        &mock,
        config(
            &mock,
            "127.0.0.1:0",
            &embedded(&dir),
            &format!("[resume]\nsecret_env = \"{}\"\n", SECRET.0),
        ),
    );
    let mut a = Gateway::start_with(&dir, &cfg, &[], &[SECRET, PROVIDER]).await;
    survives_a_sigkill(&mock, &mut a, async || {
        Gateway::start_with(&dir, &cfg, &[], &[SECRET, PROVIDER]).await
    })
    .await;
}

/// The gateway of [`with_responses`] whose Responses upstream asks the
/// provider for background responses of its own (`provider_background`),
/// on the embedded store, with a drain of `grace`.
fn provider_background_config(mock: &Mock, dir: &std::path::Path, grace: &str) -> String {
    let extra = format!(
        "[resume]\nsecret_env = \"{}\"\n[drain]\npre_stop_delay = \"0s\"\ngrace = \"{grace}\"\nexit_timeout = \"2s\"\n",
        SECRET.0
    );
    let config = config(mock, "127.0.0.1:0", &embedded(dir), &extra);
    format!(
        "{}provider_background = true\n",
        with_responses(mock, config)
    )
}

/// The SDKs' own resume: `GET /v1/responses/{id}?stream=true&starting_after=N`
/// with the key that created the response; the events after `last`.
async fn resume_after(gw: &Gateway, id: &str, last: u64) -> Vec<SseEvent> {
    let mut resumed = Sse::get(
        &gw.url(&format!(
            "/v1/responses/{id}?stream=true&starting_after={last}"
        )),
        &[("authorization", "Bearer sk-test")],
    )
    .await;
    assert_eq!(resumed.status, 200);
    resumed.rest().await
}

/// The text of Responses events.
fn deltas(events: &[SseEvent]) -> String {
    events
        .iter()
        .map(SseEvent::json)
        .filter(|v| v["type"] == "response.output_text.delta")
        .filter_map(|v| v["delta"].as_str().map(str::to_owned))
        .collect()
}

/// A stream made in the provider's own background response, cut by `cut`
/// (SIGKILL, or SIGTERM and the drain deadline) mid-answer, resumed from a
/// new process with the SDKs' own call: the exact answer, its events
/// numbered 0, 1, … once each, from one provider call that generated each
/// token once — a re-attach, not a continuation.
async fn reattaches_after(cut: &str) {
    let dir = tempdir();
    let mock = mock(&dir).await;
    let cfg = provider_background_config(&mock, &dir, "1s");
    let mut gw = Gateway::start_with(&dir, &cfg, &[], &[SECRET, PROVIDER]).await;
    let mut req = request(cut, 50, 60);
    req["stream"] = json!(true);
    let before = mock.stat("tokens_sent").await;
    let want = exact(&mock, &req).await;
    let answer_tokens = mock.stat("tokens_sent").await - before;
    let (started, tokens) = (
        mock.stat("requests_started").await,
        mock.stat("tokens_sent").await,
    );
    let mut sse = Sse::from(create(&gw.url("/v1/responses"), &req, None).await).await;
    assert_eq!(sse.status, 200);
    let mut seen = sse.take(12).await;
    let id = seen[0].json()["response"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(seen[0].json()["type"], "response.created");
    assert!(deltas(&seen).len() > 3, "{seen:?}");
    if cut == "KILL" {
        gw.proc.kill().await;
    } else {
        gw.proc.signal("TERM");
        seen.extend(sse.rest().await);
        let last = seen.last().unwrap().json();
        assert_eq!(last["type"], "error", "{last}");
        assert_eq!(last["code"], "server_restarting", "{last}");
        gw.proc.exit(Duration::from_secs(10)).await;
    }
    drop(sse);
    let numbered: Vec<&SseEvent> = seen
        .iter()
        .filter(|e| e.json()["type"] != "error")
        .collect();
    let last = numbered.last().unwrap().json()["sequence_number"]
        .as_u64()
        .unwrap();
    let gw = Gateway::start_with(&dir, &cfg, &[], &[SECRET, PROVIDER]).await;
    let rest = resume_after(&gw, &id, last).await;
    let all: Vec<SseEvent> = numbered.into_iter().cloned().chain(rest).collect();
    assert_whole(&all, &want);
    assert!(
        all.iter()
            .filter_map(|e| e.json()["response"]["id"].as_str().map(str::to_owned))
            .all(|r| r == id),
        "every response object is named by the gateway's id"
    );
    assert!(
        all.iter()
            .filter(|e| e.json()["response"].is_object())
            .all(|e| e.json()["response"]["background"] == false),
        "the client did not ask for a background response: {all:?}"
    );
    assert_eq!(
        mock.stat("requests_started").await - started,
        1,
        "no second generation"
    );
    assert_eq!(
        mock.stat("tokens_sent").await - tokens,
        answer_tokens,
        "every token generated once"
    );
    assert_eq!(gw.metric("tidegate_reattaches_total").await, 1.0);
    assert_eq!(gw.metric("tidegate_continuations_total").await, 0.0);
}

#[tokio::test]
async fn a_stream_in_the_providers_background_response_reattaches_after_a_sigkill() {
    reattaches_after("KILL").await;
}

#[tokio::test]
async fn a_stream_in_the_providers_background_response_reattaches_after_the_drain() {
    reattaches_after("TERM").await;
}

/// A client that leaves a stream made in the provider's background
/// response cancels that response (dropping the connection would not stop
/// it); a resume after that is a continuation, and still exact.
#[tokio::test]
async fn a_client_that_leaves_cancels_the_providers_background_response() {
    let dir = tempdir();
    let mock = mock(&dir).await;
    let cfg = provider_background_config(&mock, &dir, "1s");
    let gw = Gateway::start_with(&dir, &cfg, &[], &[SECRET, PROVIDER]).await;
    let mut req = request("leaving", 50, 60);
    req["stream"] = json!(true);
    let want = exact(&mock, &req).await;
    let cancelled = mock.stat("requests_cancelled").await;
    let mut sse = Sse::from(create(&gw.url("/v1/responses"), &req, None).await).await;
    let seen = sse.take(10).await;
    let id = seen[0].json()["response"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(sse);
    let n = mock
        .wait_for("requests_cancelled", cancelled + 1, Duration::from_secs(10))
        .await;
    assert_eq!(
        n,
        cancelled + 1,
        "the provider's response was not cancelled"
    );
    let last = seen.last().unwrap().json()["sequence_number"]
        .as_u64()
        .unwrap();
    let rest = resume_after(&gw, &id, last).await;
    let all: Vec<SseEvent> = seen.into_iter().chain(rest).collect();
    assert_eq!(deltas(&all), want);
    assert_eq!(gw.metric("tidegate_reattaches_total").await, 0.0);
    assert_eq!(gw.metric("tidegate_continuations_total").await, 1.0);
}

/// A stream made in the provider's background response is cut after its
/// message is whole, while the function call after it is still held; the
/// provider then restarts and no longer has the response, so it refuses
/// the re-attach (404). The stored events need only their end: the resume
/// ends the answer `completed` with what was said, as a resume without a
/// re-attach would, not with the provider's refusal.
#[tokio::test]
async fn a_refused_reattach_ends_an_answer_that_needs_only_its_end() {
    let dir = tempdir();
    let mut mock = mock(&dir).await;
    let cfg = provider_background_config(&mock, &dir, "1s");
    let mut gw = Gateway::start_with(&dir, &cfg, &[], &[SECRET, PROVIDER]).await;
    let mut req = request("refused", 4, 60);
    req["stream"] = json!(true);
    req["tools"] =
        json!([{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]);
    req["mock"] =
        json!({"shape": "tools", "content_words": 4, "tool_words": 60, "token_interval_ms": 60});
    let mut sse = Sse::from(create(&gw.url("/v1/responses"), &req, None).await).await;
    assert_eq!(sse.status, 200);
    let mut seen = Vec::new();
    while let Some(event) = sse.next().await {
        let v = event.json();
        seen.push(event);
        if v["type"] == "response.output_item.done" && v["item"]["type"] == "message" {
            break;
        }
    }
    let said = seen.last().unwrap().json();
    assert_eq!(said["type"], "response.output_item.done", "{seen:?}");
    let text = said["item"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(text.split_whitespace().count(), 4);
    let id = seen[0].json()["response"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let last = said["sequence_number"].as_u64().unwrap();
    // The gateway dies inside the function call; so does the provider.
    gw.proc.kill().await;
    drop(sse);
    let listen = mock.proc.url().trim_start_matches("http://").to_owned();
    mock.proc.kill().await;
    let mock = Mock::with_key_at(&dir, PROVIDER.1, &listen, "mock-restarted.log").await;
    let gw = Gateway::start_with(&dir, &cfg, &[], &[SECRET, PROVIDER]).await;
    let rest = resume_after(&gw, &id, last).await;
    let end = rest.last().expect("the rest of the stream").json();
    assert_eq!(end["type"], "response.completed", "{rest:?}");
    assert_eq!(end["response"]["id"], id);
    assert_eq!(end["response"]["status"], "completed");
    assert_eq!(output_text(&end["response"]), text, "what was said, whole");
    assert!(rest.iter().all(|e| e.json()["type"] != "error"), "{rest:?}");
    let numbers: Vec<u64> = rest
        .iter()
        .map(|e| e.json()["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(
        numbers,
        (last + 1..last + 1 + rest.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(
        mock.stat("requests_started").await,
        0,
        "no generation asked of the restarted provider"
    );
    assert!(
        mock.stat("requests_rejected").await >= 1,
        "the re-attach was refused"
    );
    assert_eq!(gw.metric("tidegate_reattaches_total").await, 1.0);
    assert_eq!(gw.metric("tidegate_continuations_total").await, 0.0);
    assert_eq!(retrieve(&gw, &id).await["status"], "completed");
}
