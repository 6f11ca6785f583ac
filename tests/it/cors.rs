//! CORS for browser clients on other origins: off by default; with
//! `[cors] allow_origins`, preflights of the `/v1` routes are answered for
//! those origins only, and a page can read the stream id and resume token.

use crate::common::*;

const ORIGIN: &str = "https://chat.example.com";

async fn preflight(gw: &Gateway, path: &str, origin: &str) -> reqwest::Response {
    client()
        .request(reqwest::Method::OPTIONS, gw.url(path))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,x-tidegate-resume-token",
        )
        .send()
        .await
        .unwrap()
}

fn allowed(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("access-control-allow-origin")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[tokio::test]
async fn configured_origins_get_answers_and_others_do_not() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let extra = format!("[cors]\nallow_origins = [\"{ORIGIN}\"]\n");
    let gw = Gateway::start(
        &dir,
        &config(&mock, "127.0.0.1:0", "kind = \"memory\"", &extra),
    )
    .await;

    let response = preflight(&gw, "/v1/chat/completions", ORIGIN).await;
    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(allowed(&response).as_deref(), Some(ORIGIN));
    let headers = response.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    for name in ["authorization", "content-type", "x-tidegate-resume-token"] {
        assert!(headers.contains(name), "{headers}");
    }
    let response = preflight(&gw, "/v1/streams/tg_x", ORIGIN).await;
    assert_eq!(allowed(&response).as_deref(), Some(ORIGIN));

    // The stream itself: readable by the page, its id and token exposed.
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .header("origin", ORIGIN)
        .json(&chat(3, 0, "cors"))
        .send()
        .await
        .unwrap();
    assert_eq!(allowed(&response).as_deref(), Some(ORIGIN));
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        exposed.contains("x-tidegate-stream-id") && exposed.contains("x-tidegate-resume-token"),
        "{exposed}"
    );
    let events = Sse::from(response).await.rest().await;
    assert!(events.last().unwrap().is_done());

    // Another origin, and the admin routes: no CORS answer.
    let response = preflight(&gw, "/v1/chat/completions", "https://evil.example").await;
    assert_eq!(allowed(&response), None);
    let response = preflight(&gw, "/admin/drain", ORIGIN).await;
    assert_eq!(allowed(&response), None);
}

#[tokio::test]
async fn cors_is_off_by_default() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let gw = Gateway::start(&dir, &config(&mock, "127.0.0.1:0", "kind = \"memory\"", "")).await;
    let response = preflight(&gw, "/v1/chat/completions", ORIGIN).await;
    assert_eq!(allowed(&response), None);
    let response = client()
        .post(gw.url("/v1/chat/completions"))
        .header("origin", ORIGIN)
        .json(&chat(3, 0, "cors"))
        .send()
        .await
        .unwrap();
    assert_eq!(allowed(&response), None);
}
