//! Several upstreams per model, against two real mock providers: weights
//! split the traffic and a route key keeps a conversation on one; a
//! request the provider did not start is sent again elsewhere, one it may
//! have started never is; a provider that dies mid-answer is failed over
//! by continuation into one exact answer; an ejected upstream gets nothing
//! until its half-open probe answers.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

/// Two upstreams `a` and `b` serving `chat-*` as one group, with weights,
/// and `more` added to each entry.
fn pair(a: &Mock, b: &Mock, weights: (u32, u32), more: &str, extra: &str) -> String {
    let entry = |name: &str, mock: &Mock, weight: u32| {
        format!(
            "[[upstreams]]\nname = \"{name}\"\nbase_url = \"{}\"\nmodels = [\"chat-*\"]\nweight = {weight}\ncontinuation = \"continue_final_message\"\nfirst_byte_timeout = \"2s\"\nidle_timeout = \"1s\"\n{more}\n",
            mock.base_url()
        )
    };
    format!(
        "listen = \"127.0.0.1:0\"\n{extra}\n[store]\nkind = \"memory\"\n\n{}{}",
        entry("a", a, weights.0),
        entry("b", b, weights.1)
    )
}

fn ask(words: u64, topic: &str) -> Value {
    json!({
        "model": "chat-1",
        "messages": [{"role": "user", "content": format!("tell me about {topic} and tides and gates")}],
        "stream": true,
        "max_tokens": words,
    })
}

/// Stream `body` (with `headers`) to the end; the events.
async fn stream(gw: &Gateway, body: &Value, headers: &[(&str, &str)]) -> Vec<SseEvent> {
    let mut request = client().post(gw.url("/v1/chat/completions")).json(body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let mut sse = Sse::from(request.send().await.unwrap()).await;
    assert_eq!(sse.status, 200);
    sse.rest().await
}

/// A whole answer: contiguous ids, `[DONE]` last, no abort.
fn assert_whole(events: &[SseEvent]) {
    assert!(events.last().is_some_and(SseEvent::is_done), "{events:?}");
    assert!(events.iter().all(|e| e.error().is_none()), "{events:?}");
    assert_contiguous(&ids_of(events));
}

#[tokio::test]
async fn weights_split_the_traffic_and_a_route_key_keeps_a_conversation_on_one_upstream() {
    let dir = tempdir();
    let (a, b) = (
        Mock::with_args(&dir.join("a"), &[]).await,
        Mock::with_args(&dir.join("b"), &[]).await,
    );
    let gw = Gateway::start(&dir, &pair(&a, &b, (3, 1), "", "")).await;
    let n = 160;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let url = gw.url("/v1/chat/completions");
        tasks.spawn(async move {
            let r = client()
                .post(url)
                .json(&ask(2, &format!("split {i}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        });
        if tasks.len() >= 8 {
            assert!(tasks.join_next().await.unwrap().unwrap().contains("[DONE]"));
        }
    }
    while let Some(done) = tasks.join_next().await {
        assert!(done.unwrap().contains("[DONE]"));
    }
    let (on_a, on_b) = (
        a.stat("requests_started").await,
        b.stat("requests_started").await,
    );
    assert_eq!(on_a + on_b, n, "one generation per stream");
    // 3:1 → 75 %; a binomial over 160 has a standard deviation of 3.4
    // points: ±13 points is nearly 4 of them.
    let share = on_a as f64 / n as f64;
    println!("weights 3:1 over {n} streams: a {on_a}, b {on_b}");
    assert!((share - 0.75).abs() <= 0.13, "a got {on_a} of {n}");

    // One conversation, one upstream: by header, and by the body's `user`.
    for (headers, user) in [
        (vec![("x-tidegate-route-key", "conversation-7")], None),
        (vec![], Some("alice@example.com")),
    ] {
        let before = (
            a.stat("requests_started").await,
            b.stat("requests_started").await,
        );
        for i in 0..24 {
            let mut body = ask(2, &format!("turn {i}"));
            if let Some(user) = user {
                body["user"] = json!(user);
            }
            assert_whole(&stream(&gw, &body, &headers).await);
        }
        let moved = (
            a.stat("requests_started").await - before.0,
            b.stat("requests_started").await - before.1,
        );
        assert!(
            moved == (24, 0) || moved == (0, 24),
            "{moved:?} for {headers:?} {user:?}"
        );
    }
}

#[tokio::test]
async fn a_request_the_provider_refused_goes_to_another_upstream_and_is_generated_once() {
    let dir = tempdir();
    let a = Mock::with_args(&dir.join("a"), &["--down"]).await;
    let b = Mock::with_args(&dir.join("b"), &[]).await;
    // A long rest: no half-open probe within the test.
    let gw = Gateway::start(&dir, &pair(&a, &b, (1, 1), "eject_for = \"10m\"", "")).await;
    let n = 40;
    let mut texts = Vec::new();
    for i in 0..n {
        let events = stream(&gw, &ask(3, &format!("retry {i}")), &[]).await;
        assert_whole(&events);
        texts.push(text_of(&events));
    }
    // `a` answered 503 (it generated nothing) until 5 in a row ejected it.
    assert_eq!(a.stat("requests_started").await, 0);
    assert_eq!(a.stat("requests_failed").await, 5);
    assert_eq!(
        b.stat("requests_started").await,
        n,
        "never a second generation"
    );
    assert_eq!(
        gw.metric("tidegate_upstream_retries_total{upstream=\"a\"}")
            .await,
        5.0
    );
    assert_eq!(
        gw.metric("tidegate_upstream_available{upstream=\"a\"}")
            .await,
        0.0
    );
    assert_eq!(
        gw.metric("tidegate_upstream_ejections_total{upstream=\"a\"}")
            .await,
        1.0
    );
    assert_eq!(
        gw.metric("tidegate_upstream_outcomes_total{upstream=\"a\",outcome=\"failed\"}")
            .await,
        5.0
    );
    assert!(
        gw.proc.log_text().contains("upstream_ejected"),
        "the ejection is logged as an alert"
    );
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(*text, b.answer(&ask(3, &format!("retry {i}"))).await);
    }
}

#[tokio::test]
async fn a_request_the_provider_may_have_started_is_never_sent_again() {
    let dir = tempdir();
    let (a, b) = (
        Mock::with_args(&dir.join("a"), &[]).await,
        Mock::with_args(&dir.join("b"), &[]).await,
    );
    // All traffic to `a`; `b` is there to be retried on, and must not be.
    let gw = Gateway::start(&dir, &pair(&a, &b, (1, 0), "", "")).await;
    let mut body = ask(3, "slow head");
    // The head comes after the first-byte timeout (2 s): the request was
    // sent and may be generating.
    body["mock"] = json!({"delay_ms": 3000});
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(b.stat("requests_started").await, 0, "not sent again");
    assert_eq!(
        gw.metric("tidegate_upstream_retries_total{upstream=\"a\"}")
            .await,
        0.0
    );
    // A 400 is the request's fault: not retried either.
    let mut bad = ask(3, "bad");
    bad["mock"] = json!({"status": 400});
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(b.stat("requests_started").await, 0);
    assert_eq!(
        gw.metric("tidegate_upstream_outcomes_total{upstream=\"a\",outcome=\"rejected\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_provider_that_dies_mid_answer_is_failed_over_into_one_exact_answer() {
    let dir = tempdir();
    let a = Mock::with_args(&dir.join("a"), &["--die-after", "6"]).await;
    let b = Mock::with_args(&dir.join("b"), &[]).await;
    let gw = Gateway::start(&dir, &pair(&a, &b, (1, 0), "eject_after = 100", "")).await;
    let n = 5;
    let mut texts = Vec::new();
    for i in 0..n {
        let events = stream(&gw, &ask(14, &format!("failover {i}")), &[]).await;
        assert_whole(&events);
        texts.push(text_of(&events));
    }
    assert_eq!(a.stat("requests_started").await, n);
    assert_eq!(b.stat("requests_started").await, n, "one continuation each");
    for (i, text) in texts.iter().enumerate() {
        let whole = b.answer(&ask(14, &format!("failover {i}"))).await;
        assert_eq!(*text, whole, "stream {i} is exactly the provider's answer");
    }
    assert_eq!(gw.metric("tidegate_failovers_total").await, n as f64);
    assert_eq!(
        gw.metric("tidegate_upstream_failovers_total{upstream=\"a\"}")
            .await,
        n as f64
    );
    assert_eq!(
        gw.metric("tidegate_upstream_outcomes_total{upstream=\"b\",outcome=\"completed\"}")
            .await,
        n as f64
    );
    assert!(gw.proc.log_text().contains("failover"));

    // One failover per stream: when the second upstream dies too, the
    // client is told honestly, and may resume.
    b.set_faults(json!({"die_after": 10})).await;
    let events = stream(&gw, &ask(14, "both die"), &[]).await;
    let abort = events.last().and_then(SseEvent::error).expect("an abort");
    assert_eq!(abort["type"], "upstream_failed", "{abort}");
    assert_eq!(abort["resume"], true);
    assert_contiguous(&ids_of(&events));
}

#[tokio::test]
async fn an_ejected_upstream_gets_nothing_until_its_half_open_probe_answers() {
    let dir = tempdir();
    let a = Mock::with_args(&dir.join("a"), &["--down"]).await;
    let b = Mock::with_args(&dir.join("b"), &[]).await;
    let gw = Gateway::start(
        &dir,
        &pair(&a, &b, (1, 1), "eject_after = 2\neject_for = \"300ms\"", ""),
    )
    .await;
    // Until two requests in a row failed on `a`.
    let mut i = 0;
    while a.stat("requests_failed").await - a.stat("models_requests").await < 2 {
        assert_whole(&stream(&gw, &ask(2, &format!("eject {i}")), &[]).await);
        i += 1;
        assert!(i < 100, "a never got two requests");
    }
    let generation_failures =
        |s: Value| s["requests_failed"].as_u64().unwrap() - s["models_requests"].as_u64().unwrap();
    assert_eq!(generation_failures(a.stats().await), 2);
    // Ejected: only probes reach it (every 300 ms, failing: it is down).
    for i in 0..30 {
        assert_whole(&stream(&gw, &ask(2, &format!("while out {i}")), &[]).await);
    }
    assert_eq!(
        generation_failures(a.stats().await),
        2,
        "no traffic while ejected"
    );
    assert!(
        a.wait_for("models_requests", 1, Duration::from_secs(5))
            .await
            >= 1,
        "the half-open probe asks the models endpoint"
    );
    // It comes back: the next probe answers, and it takes traffic again.
    a.set_faults(json!({"down": false})).await;
    let back = eventually(Duration::from_secs(10), || async {
        gw.metric("tidegate_upstream_available{upstream=\"a\"}")
            .await
            == 1.0
    })
    .await;
    assert!(back, "the probe closed the breaker");
    for i in 0..40 {
        assert_whole(&stream(&gw, &ask(2, &format!("back {i}")), &[]).await);
    }
    assert!(
        a.stat("requests_started").await > 0,
        "traffic again after the probe"
    );
    assert!(gw.proc.log_text().contains("upstream_restored"));
}

const ADMIN: (&str, &str) = ("TG_TEST_ADMIN_TOKEN", "admin-secret-for-tests");

/// `a` (legacy, weight 100) and `b` (next, weight 0) with `canary` between
/// them, the admin routes on, and `store`.
fn canary_config(a: &Mock, b: &Mock, canary: &str, store: &str) -> String {
    let config = pair(
        a,
        b,
        (100, 0),
        "eject_after = 1000",
        &format!("[admin]\ntoken_env = \"{}\"\n", ADMIN.0),
    )
    .replace("kind = \"memory\"", store);
    format!("{config}\n[[canaries]]\nfrom = \"a\"\nto = \"b\"\n{canary}\n")
}

async fn canary_state(gw: &Gateway) -> Value {
    let r = client()
        .get(gw.url("/admin/canary"))
        .bearer_auth(ADMIN.1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let list: Value = r.json().await.unwrap();
    list[0].clone()
}

async fn canary_action(gw: &Gateway, action: &str) -> (u16, Value) {
    let r = client()
        .post(gw.url(&format!("/admin/canary/b/{action}")))
        .bearer_auth(ADMIN.1)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Generations a mock was asked for, failed ones included.
async fn asked(mock: &Mock) -> u64 {
    mock.stat("requests_started").await + mock.stat("requests_failed").await
}

#[tokio::test]
async fn a_canary_whose_provider_fails_ten_percent_is_rolled_back_within_its_sample() {
    let dir = tempdir();
    let a = Mock::with_args(&dir.join("a"), &[]).await;
    let b = Mock::with_args(&dir.join("b"), &["--fail-rate", "0.1"]).await;
    let canary = "phases = [50, 100]\nhold = \"1h\"\nmin_requests = 20\n";
    let gw = Gateway::start_with(
        &dir,
        &canary_config(&a, &b, canary, "kind = \"memory\""),
        &[],
        &[ADMIN],
    )
    .await;
    assert_eq!(canary_state(&gw).await["percent"], 50.0);
    let mut i = 0;
    while canary_state(&gw).await["state"] == "advancing" {
        // Every client gets its whole answer: a refusal before the first
        // byte is retried on `a`.
        assert_whole(&stream(&gw, &ask(2, &format!("canary {i}")), &[]).await);
        i += 1;
        assert!(i < 400, "never rolled back: {}", canary_state(&gw).await);
    }
    let state = canary_state(&gw).await;
    assert_eq!(state["state"], "rolled_back", "{state}");
    assert_eq!(state["percent"], 0.0);
    // The verdict came with the minimum sample (the tick follows the
    // outcomes within 50 ms; sequential streams add a few more).
    let at_verdict = asked(&b).await;
    println!(
        "rolled back after {i} streams; b asked {at_verdict} times, {} of them failed",
        b.stat("requests_failed").await
    );
    assert!(
        (20..=40).contains(&at_verdict),
        "b was asked {at_verdict} times by the verdict"
    );
    assert_eq!(
        gw.metric("tidegate_canary_transitions_total{to=\"b\",kind=\"rolled_back\"}")
            .await,
        1.0
    );
    assert_eq!(gw.metric("tidegate_canary_percent{to=\"b\"}").await, 0.0);
    let log = gw.proc.log_text();
    assert!(
        log.contains("alert=\"canary\"") || log.contains("alert=canary"),
        "{log}"
    );
    assert!(log.contains("rolled_back"));
    // Rolled back: `b` gets nothing more.
    for i in 0..20 {
        assert_whole(&stream(&gw, &ask(2, &format!("after {i}")), &[]).await);
    }
    assert_eq!(asked(&b).await, at_verdict);
}

#[tokio::test]
async fn a_healthy_canary_advances_through_every_phase_and_completes() {
    let dir = tempdir();
    let (a, b) = (
        Mock::with_args(&dir.join("a"), &[]).await,
        Mock::with_args(&dir.join("b"), &[]).await,
    );
    let canary = "phases = [10, 50, 100]\nhold = \"300ms\"\nmin_requests = 5\n";
    let gw = Gateway::start_with(
        &dir,
        &canary_config(&a, &b, canary, "kind = \"memory\""),
        &[],
        &[ADMIN],
    )
    .await;
    let mut seen = vec![canary_state(&gw).await["percent"].as_f64().unwrap()];
    let mut i = 0;
    while canary_state(&gw).await["state"] != "complete" {
        assert_whole(&stream(&gw, &ask(2, &format!("healthy {i}")), &[]).await);
        let p = canary_state(&gw).await["percent"].as_f64().unwrap();
        if seen.last() != Some(&p) {
            seen.push(p);
        }
        i += 1;
        assert!(i < 2000, "stuck at {}", canary_state(&gw).await);
    }
    assert_eq!(seen, [10.0, 50.0, 100.0]);
    assert_eq!(
        gw.metric("tidegate_canary_transitions_total{to=\"b\",kind=\"advanced\"}")
            .await,
        2.0
    );
    assert_eq!(
        gw.metric("tidegate_canary_transitions_total{to=\"b\",kind=\"completed\"}")
            .await,
        1.0
    );
    // Complete: everything goes to `b`.
    let before = a.stat("requests_started").await;
    for i in 0..20 {
        assert_whole(&stream(&gw, &ask(2, &format!("done {i}")), &[]).await);
    }
    assert_eq!(a.stat("requests_started").await, before);
}

#[tokio::test]
async fn operators_advance_hold_and_roll_back_and_the_state_survives_a_restart() {
    let dir = tempdir();
    let (a, b) = (
        Mock::with_args(&dir.join("a"), &[]).await,
        Mock::with_args(&dir.join("b"), &[]).await,
    );
    let config = canary_config(&a, &b, "hold = \"1h\"\n", &embedded(&dir));
    let mut gw = Gateway::start_with(&dir, &config, &[], &[ADMIN]).await;
    let state = canary_state(&gw).await;
    assert_eq!(state["from"], "a");
    assert_eq!(state["to"], "b");
    assert_eq!(state["percent"], 1.0, "{state}");
    assert_eq!(state["state"], "advancing");
    // Without the admin token: 401; an unknown canary or action: 404.
    let r = client().get(gw.url("/admin/canary")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .post(gw.url("/admin/canary/nobody/advance"))
        .bearer_auth(ADMIN.1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(canary_action(&gw, "sideways").await.0, 404);

    let (status, after) = canary_action(&gw, "advance").await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["percent"], 5.0);
    let (status, after) = canary_action(&gw, "hold").await;
    assert_eq!((status, after["state"].clone()), (200, json!("held")));
    assert_eq!(canary_action(&gw, "hold").await.0, 409, "held already");

    // A restart keeps the phase and the state.
    gw.proc.signal("TERM");
    assert!(gw.proc.exit(Duration::from_secs(10)).await.success());
    let mut gw = Gateway::start_with(&dir, &config, &[], &[ADMIN]).await;
    let state = canary_state(&gw).await;
    assert_eq!(
        (state["percent"].clone(), state["state"].clone()),
        (json!(5.0), json!("held")),
        "{state}"
    );

    let (status, after) = canary_action(&gw, "rollback").await;
    assert_eq!((status, after["percent"].clone()), (200, json!(0.0)));
    assert_eq!(canary_action(&gw, "rollback").await.0, 409);
    for i in 0..10 {
        assert_whole(&stream(&gw, &ask(2, &format!("rolled back {i}")), &[]).await);
    }
    assert_eq!(b.stat("requests_started").await, 0);
    gw.proc.kill().await;
}

#[tokio::test]
async fn replicas_on_redis_share_the_canary_state() {
    let dir = tempdir();
    let (a, b) = (
        Mock::with_args(&dir.join("a"), &[]).await,
        Mock::with_args(&dir.join("b"), &[]).await,
    );
    let redis = crate::replicas::Redis::start(&dir).await;
    let store = format!(
        "kind = \"redis\"\nurl = \"{}\"\n[resume]\nsecret_env = \"TG_TEST_RESUME_SECRET\"",
        redis.url()
    );
    let config = canary_config(&a, &b, "hold = \"1h\"\n", &store);
    let env = [ADMIN, ("TG_TEST_RESUME_SECRET", "shared-secret-for-tests")];
    let one = Gateway::start_with(&dir, &config, &[], &env).await;
    let two = Gateway::start_with(&dir, &config, &[], &env).await;
    assert_eq!(canary_state(&two).await["percent"], 1.0);

    // What an operator does on one replica, the other adopts (it looks at
    // the store at least once a second).
    let (status, after) = canary_action(&one, "advance").await;
    assert_eq!((status, after["percent"].clone()), (200, json!(5.0)));
    let adopted = eventually(Duration::from_secs(5), || async {
        canary_state(&two).await["percent"] == 5.0
    })
    .await;
    assert!(adopted, "{}", canary_state(&two).await);
    let (status, after) = canary_action(&two, "rollback").await;
    assert_eq!(
        (status, after["state"].clone()),
        (200, json!("rolled_back"))
    );
    let adopted = eventually(Duration::from_secs(5), || async {
        let state = canary_state(&one).await;
        state["state"] == "rolled_back" && state["percent"] == 0.0
    })
    .await;
    assert!(adopted, "{}", canary_state(&one).await);
    // Rolled back everywhere: neither replica sends the canary anything.
    for (i, gw) in [&one, &two].into_iter().enumerate() {
        for j in 0..5 {
            assert_whole(&stream(gw, &ask(2, &format!("shared {i} {j}")), &[]).await);
        }
    }
    assert_eq!(b.stat("requests_started").await, 0);
}

#[tokio::test]
async fn after_a_failover_and_a_restart_the_stream_continues_where_it_was_moved() {
    let dir = tempdir();
    let a = Mock::with_args(&dir.join("a"), &["--die-after", "6"]).await;
    let b = Mock::with_args(&dir.join("b"), &["--token-interval-ms", "40"]).await;
    let config = pair(
        &a,
        &b,
        (1, 0),
        "eject_after = 100",
        "[drain]\npre_stop_delay = \"0s\"\ngrace = \"300ms\"\nexit_timeout = \"2s\"\n",
    )
    .replace("kind = \"memory\"", &embedded(&dir));
    let mut gw = Gateway::start(&dir, &config).await;
    let request = ask(60, "moved and restarted");
    let mut sse = Sse::post(&gw.url("/v1/chat/completions"), &request).await;
    let (id, token) = (
        sse.header("x-tidegate-stream-id"),
        sse.header("x-tidegate-resume-token"),
    );
    // Past the failover (b answers from the 7th unit on), then a restart.
    let mut events = sse.take(10).await;
    assert_eq!(b.stat("requests_started").await, 1);
    gw.proc.signal("TERM");
    events.extend(sse.rest().await);
    let abort = events
        .last()
        .and_then(SseEvent::error)
        .expect("told to resume");
    assert_eq!(abort["type"], "server_restarting");
    assert!(gw.proc.exit(Duration::from_secs(10)).await.success());

    let gw = Gateway::start(&dir, &config).await;
    let last = ids_of(&events).last().copied().unwrap_or(0).to_string();
    let mut resumed = Sse::get(
        &gw.url(&format!("/v1/streams/{id}")),
        &[
            ("x-tidegate-resume-token", &token),
            ("last-event-id", &last),
        ],
    )
    .await;
    assert_eq!(resumed.status, 200);
    events.pop();
    events.extend(resumed.rest().await);
    assert_whole(&events);
    assert_eq!(a.stat("requests_started").await, 1, "never asked again");
    assert_eq!(
        b.stat("requests_started").await,
        2,
        "the continuation went to b"
    );
    assert_eq!(text_of(&events), b.answer(&request).await);
}

#[tokio::test]
async fn a_429_is_retried_after_the_providers_retry_after_and_within_the_budget() {
    let dir = tempdir();
    let (a, b) = (
        Mock::with_args(&dir.join("a"), &[]).await,
        Mock::with_args(&dir.join("b"), &[]).await,
    );
    // The retries go to the other upstream of the group (then to the last
    // one tried); both answer this body with 429 and `Retry-After: 1`.
    let mut body = ask(3, "rate limited");
    body["mock"] = json!({"status": 429});
    let rejected =
        || async { a.stat("requests_rejected").await + b.stat("requests_rejected").await };
    // Through a gateway with `retry_within`: the status and how long it took.
    let ask_with = |retry_within: &'static str| {
        let (a, b, dir, body) = (&a, &b, &dir, &body);
        async move {
            let routing = format!("[routing]\nretry_within = \"{retry_within}\"\n");
            let gw = Gateway::start(dir, &pair(a, b, (1, 0), "eject_after = 100", &routing)).await;
            let started = std::time::Instant::now();
            let r = client()
                .post(gw.url("/v1/chat/completions"))
                .json(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), started.elapsed())
        }
    };

    let (status, took) = ask_with("10s").await;
    assert_eq!(status, 429, "the provider's status, after the last attempt");
    let asked = rejected().await;
    assert_eq!(asked, 3, "routing.attempts in all");
    // The mock says `Retry-After: 1`: two waits of at least a second each
    // (the backoff alone would be 200 ms, then 300 ms).
    assert!(took >= Duration::from_secs(2), "retried after {took:?}");

    // A Retry-After past what is left of `retry_within` ends the retries.
    let (status, _) = ask_with("1500ms").await;
    assert_eq!(status, 429);
    assert_eq!(
        rejected().await - asked,
        2,
        "one wait fits in 1.5 s, a second does not"
    );
}
