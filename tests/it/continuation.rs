//! Continuations authorized like the original, and ended honestly when the
//! provider refuses them: the client's own key presented on the resume, a
//! clear 401 without it (and no provider call), a provider's 4xx in-band
//! with its message and `resume: false`.

use serde_json::{Value, json};

use crate::common::*;

const KEY: &str = "sk-client-own-key";

/// A gateway whose upstream has no key of its own: the client's is passed
/// through, to a mock that demands it.
async fn byok(dir: &std::path::Path) -> (Mock, Gateway) {
    let mock = Mock::with_key(dir, KEY).await;
    let gw = Gateway::start(dir, &config(&mock, "127.0.0.1:0", "kind = \"memory\"", "")).await;
    (mock, gw)
}

/// Start a stream with the client's key that the provider cuts after
/// `words` words; its id, token and what the client was shown.
async fn cut_stream(gw: &Gateway, request: &Value) -> (String, String, String) {
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(request)
        .send()
        .await
        .unwrap();
    let mut sse = Sse::from(response).await;
    assert_eq!(sse.status, 200);
    let (id, token) = (
        sse.header("x-tidegate-stream-id"),
        sse.header("x-tidegate-resume-token"),
    );
    let events = sse.rest().await;
    let abort = events.last().and_then(SseEvent::error).expect("an abort");
    assert_eq!(abort["type"], "upstream_failed", "{abort}");
    assert_eq!(abort["resume"], true);
    (id, token, text_of(&events))
}

fn request() -> Value {
    json!({
        "model": "m",
        "messages": [{"role": "user", "content": "keys and tides and gates and rivers"}],
        "stream": true,
        "max_tokens": 12,
        "mock": {"fail_after": 5}
    })
}

#[tokio::test]
async fn a_continuation_carries_the_clients_own_key_presented_on_the_resume() {
    let dir = tempdir();
    let (mock, gw) = byok(&dir).await;
    let req = request();
    let whole = {
        let mut plain = req.clone();
        plain["stream"] = json!(false);
        plain["mock"] = json!({});
        let v: Value = client()
            .post(format!("{}/chat/completions", mock.base_url()))
            .bearer_auth(KEY)
            .json(&plain)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (id, token, shown) = cut_stream(&gw, &req).await;
    assert!(whole.starts_with(&shown) && shown.len() < whole.len());
    let started = mock.stat("requests_started").await;

    // No key: a clear error naming what to send, and no provider call.
    let response = client()
        .get(gw.url(&format!("/v1/streams/{id}")))
        .header("x-tidegate-resume-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"]["code"], "provider_credential_required",
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("x-tidegate-resume-token") && message.contains("Authorization"),
        "{message}"
    );
    // A bearer alone is the resume token, not a key: the same answer.
    let response = client()
        .get(gw.url(&format!("/v1/streams/{id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(mock.stat("requests_started").await, started);

    // The key beside the token: continued to exactly the whole answer.
    let response = client()
        .get(gw.url(&format!("/v1/streams/{id}")))
        .header("x-tidegate-resume-token", &token)
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let mut sse = Sse::from(response).await;
    assert_eq!(sse.status, 200);
    let events = sse.rest().await;
    assert!(events.last().unwrap().is_done(), "{events:?}");
    assert_eq!(text_of(&events), whole);
    assert_eq!(mock.stat("requests_started").await, started + 1);
}

#[tokio::test]
async fn a_provider_refusing_the_continuation_ends_it_in_band_with_its_message() {
    let dir = tempdir();
    let (_mock, gw) = byok(&dir).await;
    let (id, token, shown) = cut_stream(&gw, &request()).await;

    // A key the provider refuses (401): final, with the provider's words.
    let response = client()
        .get(gw.url(&format!("/v1/streams/{id}")))
        .header("x-tidegate-resume-token", &token)
        .bearer_auth("sk-wrong")
        .send()
        .await
        .unwrap();
    let mut sse = Sse::from(response).await;
    assert_eq!(sse.status, 200);
    let events = sse.rest().await;
    assert_eq!(text_of(&events), shown, "the replay, nothing more");
    let abort = events.last().and_then(SseEvent::error).expect("an abort");
    assert_eq!(abort["type"], "upstream_rejected", "{abort}");
    assert_eq!(abort["resume"], false);
    let message = abort["message"].as_str().unwrap();
    assert!(
        message.contains("401") && message.contains("Incorrect API key provided"),
        "{message}"
    );

    let state: Value = client()
        .get(gw.url(&format!("/v1/streams/{id}/state?token={token}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["status"], "failed", "{state}");
    assert!(
        state["reason"]
            .as_str()
            .unwrap()
            .starts_with("upstream_rejected: 401"),
        "{state}"
    );
    assert_eq!(state["choices"][0]["text"], shown);

    // Read again later, the replay ends the same way, without a provider call.
    let mut sse = Sse::get(
        &gw.url(&format!("/v1/streams/{id}")),
        &[
            ("x-tidegate-resume-token", &token),
            ("authorization", &format!("Bearer {KEY}")),
        ],
    )
    .await;
    let events = sse.rest().await;
    let abort = events.last().and_then(SseEvent::error).expect("an abort");
    assert_eq!(abort["type"], "upstream_rejected");
    assert!(
        abort["message"]
            .as_str()
            .unwrap()
            .contains("Incorrect API key provided")
    );
}

/// An Anthropic upstream on the mock, styles as given, and a stream of a
/// model that refuses prefill (as Claude 4.6+ does) cut after `cut` events.
async fn claude_4_6(dir: &std::path::Path, styles: &str) -> (Mock, Gateway, Value) {
    let mock = Mock::start(dir).await;
    let config = format!(
        "listen = \"127.0.0.1:0\"\n[store]\nkind = \"memory\"\n[[upstreams]]\nname = \"claude\"\nprotocol = \"anthropic\"\nbase_url = \"{}\"\nmodels = [\"claude-*\"]\ncontinuation = {styles}\nidle_timeout = \"2s\"\n",
        mock.base_url()
    );
    let gw = Gateway::start(dir, &config).await;
    let request = json!({
        "model": "claude-sonnet-4-6",
        "max_tokens": 40,
        "stream": true,
        "messages": [{"role": "user", "content": "prefill refused by newer models and tides"}],
        "mock": {"words": 10, "cut_after_events": 7, "fail_id": format!("f-{styles}")}
    });
    (mock, gw, request)
}

async fn requests_seen(mock: &Mock) -> Vec<Value> {
    mock.requests().await
}

fn anthropic_text(events: &[SseEvent]) -> String {
    events
        .iter()
        .filter_map(|e| {
            e.json()
                .pointer("/delta/text")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect()
}

/// Open a stream, read it to its abort, resume it; the resumed events.
async fn cut_and_resume(gw: &Gateway, request: &Value) -> (String, String, Vec<SseEvent>) {
    let mut sse = Sse::post(&gw.url("/v1/messages"), request).await;
    assert_eq!(sse.status, 200);
    let (id, token) = (
        sse.header("x-tidegate-stream-id"),
        sse.header("x-tidegate-resume-token"),
    );
    let first = sse.rest().await;
    let last = first.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("error"), "{first:?}");
    assert_eq!(last.json()["error"]["type"], "upstream_failed");
    let cursor = first
        .iter()
        .filter_map(|e| e.id)
        .max()
        .unwrap_or(0)
        .to_string();
    let mut resumed = Sse::get(
        &gw.url(&format!("/v1/streams/{id}")),
        &[
            ("x-tidegate-resume-token", &token),
            ("last-event-id", &cursor),
        ],
    )
    .await;
    let rest = resumed.rest().await;
    let mut all = first;
    all.pop();
    all.extend(rest);
    (id, token, all)
}

#[tokio::test]
async fn a_refused_prefill_falls_back_to_a_re_ask_once() {
    let dir = tempdir();
    let (mock, gw, request) = claude_4_6(&dir, "[\"assistant_prefix\", \"instruct\"]").await;
    let mut whole = request.clone();
    whole["mock"] = json!({"words": 10});
    whole["stream"] = json!(false);
    let expected: Value = client()
        .post(format!("{}/messages", mock.base_url()))
        .header("anthropic-version", "2023-06-01")
        .json(&whole)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expected = expected["content"][0]["text"].as_str().unwrap().to_owned();
    let (_, _, events) = cut_and_resume(&gw, &request).await;
    assert_eq!(
        events.last().unwrap().event.as_deref(),
        Some("message_stop"),
        "{events:?}"
    );
    // The re-ask's repeated word is trimmed at the splice: one answer.
    assert_eq!(anthropic_text(&events), expected);
    let seen = requests_seen(&mock).await;
    let statuses: Vec<u64> = seen.iter().filter_map(|r| r["status"].as_u64()).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 400).count(),
        1,
        "{statuses:?}"
    );
    let refused = seen.iter().find(|r| r["status"] == 400).unwrap();
    assert_eq!(
        refused["body"]["messages"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["role"],
        "assistant"
    );
    let reask = seen.last().unwrap();
    assert_eq!(reask["status"], 200);
    assert_eq!(
        reask["body"]["messages"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["role"],
        "user"
    );
    assert_eq!(reask["headers"]["anthropic-version"], "2023-06-01");
    assert_eq!(
        gw.metric("tidegate_continuation_fallbacks_total").await,
        1.0
    );
    assert!(
        gw.proc
            .log_text()
            .contains("falling back to the next, once")
    );
}

#[tokio::test]
async fn a_refused_prefill_with_no_other_style_ends_with_the_providers_reason() {
    let dir = tempdir();
    let (mock, gw, request) = claude_4_6(&dir, "\"assistant_prefix\"").await;
    let (id, token, events) = cut_and_resume(&gw, &request).await;
    let abort = events.last().unwrap();
    assert_eq!(abort.event.as_deref(), Some("error"));
    let error = &abort.json()["error"];
    assert_eq!(error["type"], "upstream_rejected", "{error}");
    assert_eq!(error["resume"], false);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("does not support assistant message prefill"),
        "{error}"
    );
    // One refused request, never a loop.
    let seen = requests_seen(&mock).await;
    assert_eq!(seen.iter().filter(|r| r["status"] == 400).count(), 1);
    let state: Value = client()
        .get(gw.url(&format!("/v1/streams/{id}/state")))
        .header("x-tidegate-resume-token", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["status"], "failed");
    assert!(
        state["reason"].as_str().unwrap().contains("prefill"),
        "{state}"
    );
}

#[tokio::test]
async fn provider_headers_reach_the_client_and_cookies_do_not() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let gw = Gateway::start(&dir, &config(&mock, "127.0.0.1:0", "kind = \"memory\"", "")).await;
    let check = |headers: &reqwest::header::HeaderMap, what: &str| {
        for name in [
            "x-request-id",
            "openai-processing-ms",
            "x-ratelimit-remaining-requests",
        ] {
            assert!(
                headers.contains_key(name),
                "{what}: {name} missing: {headers:?}"
            );
        }
        assert!(!headers.contains_key("set-cookie"), "{what}: {headers:?}");
    };
    let sse = Sse::post(&gw.url("/v1/chat/completions"), &chat(3, 0, "headers")).await;
    check(&sse.headers, "stream");
    assert!(sse.headers.contains_key("x-tidegate-stream-id"));
    let mut plain = chat(3, 0, "headers");
    plain["stream"] = json!(false);
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&plain)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    check(response.headers(), "whole");
    plain["mock"] = json!({"status": 429});
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&plain)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert!(
        response.headers().contains_key("retry-after"),
        "{:?}",
        response.headers()
    );
}

#[tokio::test]
async fn a_whole_answer_cut_mid_body_has_its_own_error() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let gw = Gateway::start(&dir, &config(&mock, "127.0.0.1:0", "kind = \"memory\"", "")).await;
    let mut plain = chat(6, 0, "cut mid body");
    plain["stream"] = json!(false);
    plain["mock"] = json!({"cut_after_events": 1});
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&plain)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_body_failed", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("mid-body"),
        "{body}"
    );
}
