//! Which upstream serves a request: the configured upstreams, in order,
//! matched by model glob.

use std::sync::Arc;

use super::Upstream;
use crate::protocol::Protocol;

/// Every configured upstream, in the config's order.
pub struct Upstreams {
    all: Vec<Arc<Upstream>>,
}

impl Upstreams {
    pub fn new(all: Vec<Arc<Upstream>>) -> Upstreams {
        Upstreams { all }
    }

    /// The upstream that serves `model` for a client speaking `protocol`:
    /// the first whose globs match, if it speaks that protocol.
    pub fn route(&self, model: &str, protocol: Protocol) -> Option<&Arc<Upstream>> {
        self.all
            .iter()
            .find(|u| u.config.models.iter().any(|glob| glob_match(glob, model)))
            .filter(|u| u.config.protocol == protocol)
    }

    pub fn named(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.all.iter().find(|u| u.config.name == name)
    }
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
        let file = "[[upstreams]]\nname=\"a\"\nbase_url=\"http://a/v1\"\nmodels=[\"gpt-*\"]\n[[upstreams]]\nname=\"c\"\nprotocol=\"anthropic\"\nbase_url=\"http://c/v1\"\nmodels=[\"claude-*\"]\n[[upstreams]]\nname=\"b\"\nbase_url=\"http://b/v1\"\n";
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
                .route(model, protocol)
                .map(|u| u.config.name.clone())
        };
        assert_eq!(name("gpt-4", Protocol::OpenAi).as_deref(), Some("a"));
        assert_eq!(name("llama", Protocol::OpenAi).as_deref(), Some("b"));
        assert_eq!(name("claude-3", Protocol::Anthropic).as_deref(), Some("c"));
        // The first match speaks another protocol: no route.
        assert_eq!(name("claude-3", Protocol::OpenAi), None);
        assert_eq!(
            upstreams.named("b").map(|u| u.config.name.as_str()),
            Some("b")
        );
    }
}
