//! Which upstream serves a request: the configured upstreams, matched by
//! model glob into groups, one chosen by weight.
//!
//! A model's *group* is the first upstream whose globs match it and every
//! later one that matches it with the same glob — so `models = ["chat-*"]`
//! on two upstreams makes them one group, while a catch-all `"*"` after
//! specific globs stays a fallback for the models nothing else serves.
//! Within a group a request goes by weight (a canary's weights while it
//! runs) to an upstream whose breaker is closed: by rendezvous hashing on
//! the request's route key when it has one (so one conversation stays on
//! one provider, and a weight change moves only the share it must), at
//! random otherwise. When every member is ejected, they are all tried
//! (failing open beats refusing everything). An upstream of weight 0 gets
//! nothing while another member can serve, and is the fallback when none
//! can.

use std::sync::Arc;

use super::Upstream;
use crate::protocol::Protocol;

/// Every configured upstream, in the config's order, and the canaries
/// between them.
pub struct Upstreams {
    all: Vec<Arc<Upstream>>,
    rollouts: Vec<Arc<super::rollout::Rollout>>,
}

impl Upstreams {
    pub fn new(all: Vec<Arc<Upstream>>) -> Upstreams {
        Upstreams {
            all,
            rollouts: Vec::new(),
        }
    }

    /// With the `[[canaries]]` (each `from`/`to` names one of `all`).
    pub fn with_canaries(
        all: Vec<Arc<Upstream>>,
        specs: &[crate::config::CanarySpec],
    ) -> Upstreams {
        let now = crate::stream::now_ms();
        let named = |n: &str| all.iter().find(|u| u.config.name == n).cloned();
        let rollouts = specs
            .iter()
            .filter_map(|spec| {
                Some(Arc::new(super::rollout::Rollout::new(
                    spec.clone(),
                    named(&spec.from)?,
                    named(&spec.to)?,
                    now,
                )))
            })
            .collect();
        Upstreams { all, rollouts }
    }

    pub fn rollouts(&self) -> &[Arc<super::rollout::Rollout>] {
        &self.rollouts
    }

    /// The canary whose `to` is named `to`.
    pub fn rollout(&self, to: &str) -> Option<&Arc<super::rollout::Rollout>> {
        self.rollouts.iter().find(|r| r.to.config.name == to)
    }

    pub fn all(&self) -> &[Arc<Upstream>] {
        &self.all
    }

    /// The group that serves `model` for a client speaking `protocol`, in
    /// config order; empty when none does, or the first match is another
    /// provider's (another protocol family: OpenAI's chat completions and
    /// Responses are one provider's two APIs, and a model served by one is
    /// served by an upstream of the other beside it, with the same glob).
    pub fn group(&self, model: &str, protocol: Protocol) -> Vec<&Arc<Upstream>> {
        let glob_of = |u: &Upstream| {
            u.config
                .models
                .iter()
                .find(|glob| glob_match(glob, model))
                .cloned()
        };
        let Some((first, glob)) = self.all.iter().find_map(|u| glob_of(u).map(|g| (u, g))) else {
            return Vec::new();
        };
        if first.config.protocol.family() != protocol.family() {
            return Vec::new();
        }
        self.all
            .iter()
            .filter(|u| u.config.protocol == protocol && glob_of(u).as_deref() == Some(&glob))
            .collect()
    }

    /// The upstream that serves `model` for a client speaking `protocol`,
    /// by weight among the group's members not in `exclude`; `key` (the
    /// request's route key) makes the choice the same every time.
    pub fn route(
        &self,
        model: &str,
        protocol: Protocol,
        key: Option<&str>,
        exclude: &[&str],
    ) -> Option<&Arc<Upstream>> {
        let members: Vec<&Arc<Upstream>> = self
            .group(model, protocol)
            .into_iter()
            .filter(|u| !exclude.contains(&u.config.name.as_str()))
            .collect();
        choose(&members, key)
    }

    /// Whether `model`'s group has more than one member (a route key is
    /// worth reading).
    pub fn shared(&self, model: &str, protocol: Protocol) -> bool {
        self.group(model, protocol).len() > 1
    }

    pub fn named(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.all.iter().find(|u| u.config.name == name)
    }
}

/// Pick one of `members`: the available ones with weight first, then the
/// available ones without, then (all ejected) any.
fn choose<'a>(members: &[&'a Arc<Upstream>], key: Option<&str>) -> Option<&'a Arc<Upstream>> {
    if members.len() <= 1 {
        return members.first().copied();
    }
    let available: Vec<&Arc<Upstream>> = members
        .iter()
        .copied()
        .filter(|u| u.health.available())
        .collect();
    let pool = if available.is_empty() {
        members.to_vec()
    } else {
        available
    };
    let weighted: Vec<(&Arc<Upstream>, f64)> = pool
        .iter()
        .map(|u| (*u, u.weight()))
        .filter(|(_, w)| *w > 0.0)
        .collect();
    if weighted.is_empty() {
        return pool.first().copied();
    }
    match key {
        Some(key) => weighted
            .iter()
            .map(|(u, w)| (*u, rendezvous(key, &u.config.name, *w)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(u, _)| u),
        None => {
            let total: f64 = weighted.iter().map(|(_, w)| w).sum();
            let mut at = rand::random::<f64>() * total;
            for (u, w) in &weighted {
                if at < *w {
                    return Some(u);
                }
                at -= w;
            }
            weighted.last().map(|(u, _)| *u)
        }
    }
}

/// Weighted rendezvous score of `name` for `key`: `-w / ln(h)` with `h` the
/// pair's hash in (0, 1). The highest score wins; each member wins a
/// `w / Σw` share of keys, and a weight change moves keys only to or from
/// the member whose weight changed.
fn rendezvous(key: &str, name: &str, weight: f64) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes().chain([0xff]).chain(name.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64's finaliser spreads FNV's low-entropy high bits.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let unit = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -weight / unit.ln()
}

/// `*` matches any run of characters, `?` any one; everything else is literal.
pub fn glob_match(glob: &str, text: &str) -> bool {
    let (g, t): (Vec<char>, Vec<char>) = (glob.chars().collect(), text.chars().collect());
    let (mut gi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if gi < g.len() && (g[gi] == '?' || g[gi] == t[ti]) {
            gi += 1;
            ti += 1;
        } else if gi < g.len() && g[gi] == '*' {
            star = Some((gi, ti));
            gi += 1;
        } else if let Some((sg, st)) = star {
            gi = sg + 1;
            ti = st + 1;
            star = Some((sg, st + 1));
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn globs() {
        assert!(glob_match("*", "gpt-4o"));
        assert!(glob_match("gpt-*", "gpt-4o"));
        assert!(!glob_match("gpt-*", "claude"));
        assert!(glob_match("claude-?-*", "claude-3-opus"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
    }

    #[test]
    fn routes_first_match_of_the_protocol() {
        let file = "[[upstreams]]\nname=\"a\"\nbase_url=\"http://a/v1\"\nmodels=[\"gpt-*\"]\n[[upstreams]]\nname=\"c\"\nprotocol=\"anthropic\"\nbase_url=\"http://c/v1\"\nmodels=[\"claude-*\"]\n[[upstreams]]\nname=\"b\"\nbase_url=\"http://b/v1\"\n[[upstreams]]\nname=\"r\"\nprotocol=\"openai_responses\"\nbase_url=\"http://a/v1\"\nmodels=[\"gpt-*\"]\n";
        let config =
            Config::from_toml(file, &std::collections::HashMap::<String, String>::new()).unwrap();
        let upstreams = Upstreams::new(
            config
                .upstreams
                .into_iter()
                .map(|u| Arc::new(Upstream::new(u).unwrap()))
                .collect(),
        );
        let name = |model, protocol| {
            upstreams
                .route(model, protocol, None, &[])
                .map(|u| u.config.name.clone())
        };
        assert_eq!(name("gpt-4", Protocol::OpenAi).as_deref(), Some("a"));
        assert_eq!(name("llama", Protocol::OpenAi).as_deref(), Some("b"));
        assert_eq!(name("claude-3", Protocol::Anthropic).as_deref(), Some("c"));
        // The first match speaks another protocol: no route.
        assert_eq!(name("claude-3", Protocol::OpenAi), None);
        // The other API of the first match's provider: its upstream beside
        // it, with the same glob.
        assert_eq!(
            name("gpt-4", Protocol::OpenAiResponses).as_deref(),
            Some("r")
        );
        assert_eq!(name("llama", Protocol::OpenAiResponses), None);
        assert_eq!(
            upstreams.named("b").map(|u| u.config.name.as_str()),
            Some("b")
        );
    }

    fn build(file: &str) -> Upstreams {
        let config =
            Config::from_toml(file, &std::collections::HashMap::<String, String>::new()).unwrap();
        Upstreams::new(
            config
                .upstreams
                .into_iter()
                .map(|u| Arc::new(Upstream::new(u).unwrap()))
                .collect(),
        )
    }

    const PAIR: &str = "[[upstreams]]\nname=\"legacy\"\nbase_url=\"http://a/v1\"\nmodels=[\"chat-*\"]\nweight=3\n[[upstreams]]\nname=\"next\"\nbase_url=\"http://b/v1\"\nmodels=[\"chat-*\"]\nweight=1\n[[upstreams]]\nname=\"rest\"\nbase_url=\"http://c/v1\"\n";

    #[test]
    fn a_group_is_the_members_with_the_first_matchs_glob() {
        let upstreams = build(PAIR);
        let names = |model| {
            upstreams
                .group(model, Protocol::OpenAi)
                .iter()
                .map(|u| u.config.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("chat-1"), ["legacy", "next"]);
        // The catch-all stays a fallback for everything else.
        assert_eq!(names("other"), ["rest"]);
    }

    #[test]
    fn weights_split_and_a_route_key_is_consistent() {
        let upstreams = build(PAIR);
        let pick = |key: Option<&str>| {
            upstreams
                .route("chat-1", Protocol::OpenAi, key, &[])
                .unwrap()
                .config
                .name
                .clone()
        };
        let n = 20_000;
        let legacy = (0..n).filter(|_| pick(None) == "legacy").count() as f64 / n as f64;
        assert!((legacy - 0.75).abs() < 0.02, "random share {legacy}");
        let keyed = (0..n)
            .filter(|i| pick(Some(&format!("user-{i}"))) == "legacy")
            .count() as f64
            / n as f64;
        assert!((keyed - 0.75).abs() < 0.02, "keyed share {keyed}");
        for i in 0..100 {
            let key = format!("conversation-{i}");
            let first = pick(Some(&key));
            assert!((0..5).all(|_| pick(Some(&key)) == first));
        }
        // A weight change moves keys only toward the member that gained.
        let before: Vec<String> = (0..2000).map(|i| pick(Some(&format!("k{i}")))).collect();
        upstreams.named("next").unwrap().set_weight(Some(2.0));
        for (i, was) in before.iter().enumerate() {
            let now = pick(Some(&format!("k{i}")));
            assert!(now == *was || now == "next", "key {i} moved {was} → {now}");
        }
    }

    #[test]
    fn ejected_and_excluded_members_get_nothing_unless_nothing_else_can() {
        let upstreams = build(PAIR);
        let legacy = upstreams.named("legacy").unwrap();
        for _ in 0..5 {
            legacy.health.failure();
        }
        assert!(!legacy.health.available());
        for i in 0..200 {
            let key = format!("k{i}");
            let u = upstreams
                .route("chat-1", Protocol::OpenAi, Some(&key), &[])
                .unwrap();
            assert_eq!(u.config.name, "next");
        }
        // Excluding the only available one: the ejected one, failing open.
        let u = upstreams
            .route("chat-1", Protocol::OpenAi, None, &["next"])
            .unwrap();
        assert_eq!(u.config.name, "legacy");
        // Weight 0 is a fallback: it serves when the other cannot.
        upstreams.named("next").unwrap().set_weight(Some(0.0));
        legacy.health.probed(true);
        assert!((0..100).all(|_| {
            upstreams
                .route("chat-1", Protocol::OpenAi, None, &[])
                .unwrap()
                .config
                .name
                == "legacy"
        }));
        let u = upstreams
            .route("chat-1", Protocol::OpenAi, None, &["legacy"])
            .unwrap();
        assert_eq!(u.config.name, "next");
    }
}
