//! The HTTP/1.1 pool's response-head parser (`upstream::h1`) on arbitrary
//! bytes: no panic; a head never longer than its bytes; a complete head
//! parses the same from any longer buffer (body bytes after it) and reads
//! as incomplete, not as an error, from every prefix (the pump parses a
//! head as it arrives, read by read); the framing follows from the head;
//! only the headers meant for clients are passed on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidegate::upstream::h1::fuzzing::{BodyFraming, parse_head};
use tidegate::upstream::passes_to_client;
use tidegate_fuzz::Rng;

fuzz_target!(|input: &[u8]| {
    let Ok(Some(head)) = parse_head(input) else {
        return;
    };
    assert!(head.len <= input.len());
    assert!((100..1000).contains(&head.status), "status {}", head.status);
    for name in head.passed.keys() {
        assert!(
            passes_to_client(name.as_str()),
            "{name} was passed to the client"
        );
    }
    match head.framing {
        BodyFraming::Close => assert!(!head.keep_alive, "a body to the close kept the connection"),
        BodyFraming::Length(0) | BodyFraming::Chunked | BodyFraming::Length(_) => {}
    }
    if matches!(head.status, 204 | 304) {
        assert_eq!(head.framing, BodyFraming::Length(0));
    }

    let exact = &input[..head.len];
    let again = parse_head(exact)
        .ok()
        .flatten()
        .expect("the head alone no longer parses");
    assert_eq!(
        (
            again.len,
            again.status,
            again.framing,
            again.keep_alive,
            &again.passed
        ),
        (
            head.len,
            head.status,
            head.framing,
            head.keep_alive,
            &head.passed
        )
    );
    let mut longer = exact.to_vec();
    longer.extend_from_slice(b"data: {}\n\n");
    let with_body = parse_head(&longer)
        .ok()
        .flatten()
        .expect("body bytes broke the head");
    assert_eq!(with_body.len, head.len);

    // Prefixes: all of them for a short head, a sample of a long one.
    let mut rng = Rng::new(input);
    let cuts: Vec<usize> = if head.len <= 512 {
        (0..head.len).collect()
    } else {
        (0..64).map(|_| rng.below(head.len)).collect()
    };
    for cut in cuts {
        match parse_head(&exact[..cut]) {
            Ok(None) => {}
            Ok(Some(h)) => panic!(
                "a {cut}-byte prefix of a {}-byte head parsed as {h:?}",
                head.len
            ),
            Err(e) => panic!(
                "a {cut}-byte prefix of a {}-byte head is an error: {e}",
                head.len
            ),
        }
    }
});
