//! The Anthropic Messages protocol: named events, `message_stop` as the end,
//! `event: error` aborts, and continuation by assistant prefill.

use serde_json::{Value, json};

use crate::common::*;

fn anthropic_config(mock: &Mock, dir: &std::path::Path) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\n[store]\n{}\n[[upstreams]]\nname = \"claude\"\nprotocol = \"anthropic\"\nbase_url = \"{}\"\nmodels = [\"claude-*\"]\ncontinuation = \"assistant_prefix\"\nidle_timeout = \"1s\"\n",
        embedded(dir),
        mock.base_url()
    )
}

fn text(events: &[SseEvent]) -> String {
    events
        .iter()
        .filter(|e| e.event.as_deref() == Some("content_block_delta"))
        .filter_map(|e| {
            e.json()
                .pointer("/delta/text")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn messages_stream_abort_and_continue() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let gw = Gateway::start(&dir, &anthropic_config(&mock, &dir)).await;
    let mut request = json!({
        "model": "claude-test",
        "max_tokens": 30,
        "stream": true,
        "messages": [{"role": "user", "content": "anthropic style tides and gates"}],
        "mock": {"token_interval_ms": 5, "fail_after": 8}
    });
    let mut plain = request.clone();
    plain["stream"] = json!(false);
    plain["mock"] = json!({});
    let whole: Value = client()
        .post(format!("{}/messages", mock.base_url()))
        .header("anthropic-version", "2023-06-01")
        .json(&plain)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expected = whole["content"][0]["text"].as_str().unwrap().to_owned();

    let mut sse = Sse::post(&gw.url("/v1/messages"), &request).await;
    assert_eq!(sse.status, 200);
    let (id, token) = (
        sse.header("x-tidegate-stream-id"),
        sse.header("x-tidegate-resume-token"),
    );
    let before = sse.rest().await;
    assert_eq!(before[0].event.as_deref(), Some("message_start"));
    let abort = before.last().unwrap();
    assert_eq!(abort.event.as_deref(), Some("error"));
    let error = abort.json();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "upstream_failed");
    assert_eq!(error["error"]["resume"], true);
    let last = error["error"]["last_event_id"].as_str().unwrap().to_owned();

    let after = Sse::get(
        &gw.url(&format!("/v1/streams/{id}")),
        &[
            ("x-tidegate-resume-token", &token),
            ("last-event-id", &last),
        ],
    )
    .await
    .rest()
    .await;
    assert_eq!(
        after.last().and_then(|e| e.event.as_deref()),
        Some("message_stop")
    );
    assert!(
        !after
            .iter()
            .any(|e| e.event.as_deref() == Some("message_start")),
        "no second message_start"
    );
    let mut all = before[..before.len() - 1].to_vec();
    all.extend(after);
    assert_contiguous(&ids_of(&all));
    assert_eq!(text(&all), expected);

    // Errors in Anthropic's shape.
    request["model"] = json!("gpt-4");
    let r = client()
        .post(gw.url("/v1/messages"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert!(v["error"]["message"].as_str().unwrap().contains("gpt-4"));
}
