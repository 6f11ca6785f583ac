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
