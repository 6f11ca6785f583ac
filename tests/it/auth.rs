//! Who may do what: client keys, the upstream credential that replaces the
//! client's, bring-your-own-key, and secrets kept out of the logs.

use serde_json::Value;

use crate::common::*;

const UPSTREAM_KEY: &str = "sk-upstream-very-secret";

fn cfg(mock: &Mock, dir: &std::path::Path, upstream_key: bool, client_keys: bool) -> String {
    let mut text = config(mock, "127.0.0.1:0", &embedded(dir), "");
    if upstream_key {
        text.push_str("api_key_env = \"TG_TEST_UPSTREAM_KEY\"\n");
    }
    if client_keys {
        text = text.replacen(
            "[store]",
            "[auth]\nkeys_env = \"TG_TEST_CLIENT_KEYS\"\n[store]",
            1,
        );
    }
    text
}

#[tokio::test]
async fn client_keys_and_the_injected_upstream_credential() {
    let dir = tempdir();
    let mock = Mock::with_key(&dir, UPSTREAM_KEY).await;
    let gw = Gateway::start_with(
        &dir,
        &cfg(&mock, &dir, true, true),
        &[],
        &[
            ("TG_TEST_UPSTREAM_KEY", UPSTREAM_KEY),
            ("TG_TEST_CLIENT_KEYS", "client-key-alpha, client-key-beta"),
        ],
    )
    .await;
    let url = gw.url("/v1/chat/completions");
    let request = chat(12, 0, "keys");
    for key in [None, Some("client-key-gamma")] {
        let mut req = client().post(&url).json(&request);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    // A good client key: the upstream gets the configured key instead (the
    // mock refuses anything else), and the answer streams.
    let r = client()
        .post(&url)
        .bearer_auth("client-key-beta")
        .json(&request)
        .send()
        .await
        .unwrap();
    let mut sse = Sse::from(r).await;
    assert_eq!(sse.status, 200);
    let (id, token) = (
        sse.header("x-tidegate-stream-id"),
        sse.header("x-tidegate-resume-token"),
    );
    let events = sse.rest().await;
    assert!(events.last().is_some_and(SseEvent::is_done));
    assert_eq!(mock.stat("requests_started").await, 1);

    // With client keys, the token opens its stream only beside the owner's
    // key: a leaked token alone is a 401, with another key a 404 (as for
    // an unknown stream), on every stream route.
    let stream_url = gw.url(&format!("/v1/streams/{id}?token={token}"));
    for path in ["", "/state"] {
        let url = gw.url(&format!("/v1/streams/{id}{path}?token={token}"));
        let alone = client().get(&url).send().await.unwrap();
        assert_eq!(alone.status().as_u16(), 401, "token alone on {path:?}");
        let other = client()
            .get(&url)
            .bearer_auth("client-key-alpha")
            .send()
            .await
            .unwrap();
        assert_eq!(other.status().as_u16(), 404, "another key on {path:?}");
    }
    let cancel_url = gw.url(&format!("/v1/streams/{id}?token={token}"));
    let other = client()
        .delete(&cancel_url)
        .bearer_auth("client-key-alpha")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status().as_u16(), 404);
    let alone = client().delete(&cancel_url).send().await.unwrap();
    assert_eq!(alone.status().as_u16(), 401);
    let owner = client()
        .get(&stream_url)
        .bearer_auth("client-key-beta")
        .send()
        .await
        .unwrap();
    let replay = Sse::from(owner).await.rest().await;
    assert_eq!(text_of(&replay), text_of(&events));
    // The token in its header, the key as `x-api-key`, works the same.
    let owner = Sse::get(
        &gw.url(&format!("/v1/streams/{id}")),
        &[
            ("x-tidegate-resume-token", &token),
            ("x-api-key", "client-key-beta"),
        ],
    )
    .await;
    assert_eq!(owner.status, 200);

    let log = gw.proc.log_text();
    for secret in [
        UPSTREAM_KEY,
        "client-key-alpha",
        "client-key-beta",
        token.as_str(),
    ] {
        assert!(!log.contains(secret), "`{secret}` reached the log");
    }
}

#[tokio::test]
async fn without_an_upstream_key_the_clients_own_is_passed_through() {
    let dir = tempdir();
    let mock = Mock::with_key(&dir, UPSTREAM_KEY).await;
    let gw = Gateway::start(&dir, &cfg(&mock, &dir, false, false)).await;
    let url = gw.url("/v1/chat/completions");
    let r = client()
        .post(&url)
        .bearer_auth(UPSTREAM_KEY)
        .json(&chat(5, 0, "byok"))
        .send()
        .await
        .unwrap();
    let mut sse = Sse::from(r).await;
    assert_eq!(sse.status, 200);
    assert!(sse.rest().await.last().is_some_and(SseEvent::is_done));
    // No key: the provider's own 401 comes back in the OpenAI shape.
    let r = client()
        .post(&url)
        .json(&chat(5, 0, "byok"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string());
    assert!(!gw.proc.log_text().contains(UPSTREAM_KEY));
}

/// `[auth] resume_token_only`: for a browser `EventSource`, which cannot
/// send a key, the token alone opens its stream (the choice is the
/// operator's, and `check-config` says which is in force).
#[tokio::test]
async fn resume_token_only_lets_the_token_alone_resume() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let text = cfg(&mock, &dir, false, true).replacen(
        "keys_env = \"TG_TEST_CLIENT_KEYS\"\n",
        "keys_env = \"TG_TEST_CLIENT_KEYS\"\nresume_token_only = true\n",
        1,
    );
    let gw = Gateway::start_with(
        &dir,
        &text,
        &[],
        &[("TG_TEST_CLIENT_KEYS", "client-key-alpha")],
    )
    .await;
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("client-key-alpha")
        .json(&chat(6, 0, "eventsource"))
        .send()
        .await
        .unwrap();
    let mut sse = Sse::from(r).await;
    let (id, token) = (
        sse.header("x-tidegate-stream-id"),
        sse.header("x-tidegate-resume-token"),
    );
    let events = sse.rest().await;
    let replay = Sse::get(&gw.url(&format!("/v1/streams/{id}?token={token}")), &[])
        .await
        .rest()
        .await;
    assert_eq!(text_of(&replay), text_of(&events));
    let wrong = client()
        .get(gw.url(&format!("/v1/streams/{id}?token=nope")))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 404);
}
