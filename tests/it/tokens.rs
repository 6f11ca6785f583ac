//! Resume tokens against the running binary: a wrong token for a stream
//! that exists and any token for a stream that never existed get the same
//! 404, in about the same time (medians of 1,000 tries each, printed).

use std::time::{Duration, Instant};

use crate::common::*;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test]
async fn wrong_tokens_and_unknown_streams_look_the_same() {
    let dir = tempdir();
    let mock = Mock::start(&dir).await;
    let gw = Gateway::start(&dir, &config(&mock, "127.0.0.1:0", &embedded(&dir), "")).await;
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &chat(5, 0, "timing")).await;
    let id = sse.header("x-tidegate-stream-id");
    let token = sse.header("x-tidegate-resume-token");
    sse.rest().await;
    assert_eq!(
        id.len(),
        "tg_".len() + 20,
        "{id}: 15 random bytes, 120 bits"
    );
    // A wrong token of the right shape: the real one with its last
    // character changed.
    let mut wrong = token.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'A' { 'B' } else { 'A' });
    let unknown = format!("tg_{}", "x".repeat(20));
    // One kept-alive connection, so each try is one request's work.
    let http = reqwest::Client::builder().build().unwrap();
    let get = |stream: String, token: String| {
        let http = http.clone();
        let url = gw.url(&format!("/v1/streams/{stream}/state"));
        async move {
            let started = Instant::now();
            let r = http.get(url).bearer_auth(token).send().await.unwrap();
            let status = r.status().as_u16();
            let body = r.bytes().await.unwrap();
            (started.elapsed(), status, body)
        }
    };
    let (_, ok, _) = get(id.clone(), token.clone()).await;
    assert_eq!(ok, 200, "the real token reads the state");
    let (_, _, body_wrong) = get(id.clone(), wrong.clone()).await;
    let (_, _, body_unknown) = get(unknown.clone(), wrong.clone()).await;
    assert_eq!(body_wrong, body_unknown, "one answer for both");
    let (mut t_wrong, mut t_unknown) = (Vec::new(), Vec::new());
    for _ in 0..1000 {
        let (t, status, _) = get(id.clone(), wrong.clone()).await;
        assert_eq!(status, 404);
        t_wrong.push(t);
        let (t, status, _) = get(unknown.clone(), wrong.clone()).await;
        assert_eq!(status, 404);
        t_unknown.push(t);
    }
    let slower = t_wrong
        .iter()
        .zip(&t_unknown)
        .filter(|(w, u)| w > u)
        .count();
    let (m_wrong, m_unknown) = (median(t_wrong), median(t_unknown));
    eprintln!(
        "token timing, medians of 1000: wrong token for an existing stream {m_wrong:?}, unknown stream {m_unknown:?}; the wrong-token try was slower in {slower} of 1000 pairs"
    );
    // Known and left open (see the issue note): a stream that exists
    // costs a record read and an HMAC more than one that does not, some
    // 20 µs on the embedded store. This bound only catches a regression
    // to a gap a network observer could see at once.
    let gap = m_wrong.abs_diff(m_unknown);
    assert!(gap < Duration::from_micros(200), "a timing gap of {gap:?}");
}
