//! The OpenAI Responses API against the real binary: cancel of a background
//! response from either of two replicas on one real Redis, an idempotent
//! create, and the strict refusals.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;
use crate::replicas::{Redis, SECRET, redis_config};

/// The Responses upstream beside the chat one `config` writes.
fn with_responses(mock: &Mock, config: String) -> String {
    format!(
        "{config}\n[[upstreams]]\nname = \"mock-responses\"\nprotocol = \"openai_responses\"\nbase_url = \"{}\"\nmodels = [\"*\"]\ncontinuation = \"instruct\"\nfirst_byte_timeout = \"2s\"\nidle_timeout = \"1s\"\n",
        mock.base_url()
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
    let mock = Mock::start(&dir).await;
    let redis = Redis::start(&dir).await;
    let cfg = redis_replica_config(&mock, &redis);
    let a = Gateway::start_with(&dir, &cfg, &[], &[SECRET]).await;
    let b = Gateway::start_with(&dir, &cfg, &[], &[SECRET]).await;
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
    let mock = Mock::start(&dir).await;
    let gw = Gateway::start(
        &dir,
        &with_responses(&mock, config(&mock, "127.0.0.1:0", &embedded(&dir), "")),
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
    let mock = Mock::start(&dir).await;
    let gw = Gateway::start(
        &dir,
        &with_responses(&mock, config(&mock, "127.0.0.1:0", &embedded(&dir), "")),
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
