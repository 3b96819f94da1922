//! Shadow evaluation: a complete, verified release is run on the inputs the agent recently recognised
//! (its sample) beside the answers the active release gave them, before it may go live. This module holds
//! the rule: the operator's policy (`deckhand publish --shadow min-agreement=0.95,min-samples=200`, or
//! the agent's `shadow` setting), the figures one evaluation measures, and the verdict. The agent takes
//! the sample and runs the models (agent/src/recognizer/shadow.rs).

use serde::{Deserialize, Serialize};

/// What a shadow evaluation must show before a release goes live.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The share of samples the release must answer with the active release's card (or, like it, with
    /// no card): 0 to 1.
    pub min_agreement: f64,
    /// How many samples (answered by the active release) an evaluation needs.
    pub min_samples: u32,
    /// What a shop with fewer samples does (a new shop, a quiet week).
    pub too_few: TooFew,
}

/// What happens to a release when the agent has fewer samples than the policy needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TooFew {
    /// Hold the release until the counter has brought enough samples.
    Wait,
    /// Go live on the canaries alone.
    Canaries,
}

/// Why a policy did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "{0:?} is not a shadow policy setting (expected min-agreement=0..1, min-samples=N, too-few=wait|canaries)"
    )]
    Unknown(String),
    #[error("shadow policy {key}={value:?}: {why}")]
    Value {
        key: &'static str,
        value: String,
        why: &'static str,
    },
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            min_agreement: 0.95,
            min_samples: 200,
            too_few: TooFew::Wait,
        }
    }
}

impl Policy {
    /// Checks the values a manifest or a setting brought.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if !(self.min_agreement > 0.0 && self.min_agreement <= 1.0) {
            return Err(PolicyError::Value {
                key: "min-agreement",
                value: self.min_agreement.to_string(),
                why: "must be above 0 and at most 1",
            });
        }
        if self.min_samples == 0 {
            return Err(PolicyError::Value {
                key: "min-samples",
                value: "0".into(),
                why: "must be at least 1",
            });
        }
        Ok(())
    }
}

impl std::str::FromStr for Policy {
    type Err = PolicyError;

    /// `min-agreement=0.95,min-samples=200,too-few=wait`; settings left out keep their defaults.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut p = Policy::default();
        for pair in crate::pairs::pairs(s) {
            let crate::pairs::Pair { key, value, part } =
                pair.map_err(|part| PolicyError::Unknown(part.to_owned()))?;
            let bad = |key, why| PolicyError::Value {
                key,
                value: value.to_owned(),
                why,
            };
            match key {
                "min-agreement" => {
                    p.min_agreement = value
                        .parse()
                        .map_err(|_| bad("min-agreement", "not a number"))?;
                }
                "min-samples" => {
                    p.min_samples = value
                        .parse()
                        .map_err(|_| bad("min-samples", "not a whole number"))?;
                }
                "too-few" => {
                    p.too_few = match value {
                        "wait" => TooFew::Wait,
                        "canaries" => TooFew::Canaries,
                        _ => return Err(bad("too-few", "must be wait or canaries")),
                    };
                }
                _ => return Err(PolicyError::Unknown(part.to_owned())),
            }
        }
        p.validate()?;
        Ok(p)
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "min-agreement={},min-samples={},too-few={}",
            self.min_agreement,
            self.min_samples,
            match self.too_few {
                TooFew::Wait => "wait",
                TooFew::Canaries => "canaries",
            }
        )
    }
}

/// How many disagreements an evaluation names, most frequent first.
pub const EXAMPLES: usize = 5;

/// One kind of disagreement: what the active release answered, what the candidate answered (card ids,
/// `None` for no card), and on how many samples.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disagreement {
    pub active: Option<String>,
    pub candidate: Option<String>,
    pub count: u32,
}

/// What one shadow evaluation measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Samples the active release had answered, and on how many the candidate gave the same answer.
    pub samples: u32,
    pub agreed: u32,
    /// Samples the two answered with different cards (both with a card).
    pub changed_card: u32,
    /// Samples only one of them answered with no card ("uncertain").
    pub uncertain_active: u32,
    pub uncertain_candidate: u32,
    /// The candidate's score minus the active release's, averaged over the samples.
    pub mean_score_shift: f64,
    /// Milliseconds per sample: the candidate here, the active release when it answered it live.
    pub candidate_ms: f64,
    pub active_ms: f64,
    /// The most frequent disagreements (at most [`EXAMPLES`]).
    pub examples: Vec<Disagreement>,
}

/// One sample's two answers, for [`Figures::measure`].
#[derive(Clone, Debug, PartialEq)]
pub struct Pair<'a> {
    pub active: Option<&'a str>,
    pub active_score: f32,
    pub active_ms: f64,
    pub candidate: Option<&'a str>,
    pub candidate_score: f32,
    pub candidate_ms: f64,
}

impl Figures {
    /// The figures of an evaluation, from each sample's two answers.
    pub fn measure(pairs: &[Pair<'_>]) -> Self {
        let mut f = Figures {
            samples: u32::try_from(pairs.len()).unwrap_or(u32::MAX),
            ..Figures::default()
        };
        let mut kinds: Vec<Disagreement> = Vec::new();
        let (mut shift, mut cand_ms, mut act_ms) = (0.0f64, 0.0f64, 0.0f64);
        for p in pairs {
            shift += f64::from(p.candidate_score) - f64::from(p.active_score);
            cand_ms += p.candidate_ms;
            act_ms += p.active_ms;
            f.uncertain_active += u32::from(p.active.is_none());
            f.uncertain_candidate += u32::from(p.candidate.is_none());
            if p.active == p.candidate {
                f.agreed += 1;
                continue;
            }
            if p.active.is_some() && p.candidate.is_some() {
                f.changed_card += 1;
            }
            match kinds
                .iter_mut()
                .find(|k| k.active.as_deref() == p.active && k.candidate.as_deref() == p.candidate)
            {
                Some(k) => k.count += 1,
                None => kinds.push(Disagreement {
                    active: p.active.map(str::to_owned),
                    candidate: p.candidate.map(str::to_owned),
                    count: 1,
                }),
            }
        }
        if !pairs.is_empty() {
            let n = pairs.len() as f64;
            f.mean_score_shift = shift / n;
            f.candidate_ms = cand_ms / n;
            f.active_ms = act_ms / n;
        }
        // Most frequent first; ties in the order first seen (a stable sort).
        kinds.sort_by_key(|k| std::cmp::Reverse(k.count));
        kinds.truncate(EXAMPLES);
        f.examples = kinds;
        f
    }

    /// The share of samples answered alike (1 with no samples).
    pub fn agreement(&self) -> f64 {
        if self.samples == 0 {
            1.0
        } else {
            f64::from(self.agreed) / f64::from(self.samples)
        }
    }
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "top-1 agreement {:.3} ({} of {} samples), {} changed card, no card {} -> {}, score shift {:+.3}, {:.1} ms a sample (live {:.1} ms)",
            self.agreement(),
            self.agreed,
            self.samples,
            self.changed_card,
            self.uncertain_active,
            self.uncertain_candidate,
            self.mean_score_shift,
            self.candidate_ms,
            self.active_ms
        )?;
        let name = |c: &Option<String>| c.clone().unwrap_or_else(|| "no card".into());
        for (i, d) in self.examples.iter().enumerate() {
            let sep = if i == 0 { "; e.g. " } else { ", " };
            write!(
                f,
                "{sep}{} -> {} ({}x)",
                name(&d.active),
                name(&d.candidate),
                d.count
            )?;
        }
        Ok(())
    }
}

/// What the policy says of a release, given the samples the agent has or the figures measured.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// It may go live (as far as shadow evaluation goes); the reason, for the log.
    Pass(String),
    /// It stays held, not activated, for this reason.
    Hold(String),
    /// Too few samples, and the policy says wait: evaluate again once there are `need`.
    Wait { have: u32, need: u32 },
}

impl Verdict {
    /// Before measuring: whether `have` samples are enough for `policy`, and if not, what to do.
    pub fn before(policy: &Policy, have: u32) -> Option<Verdict> {
        if have >= policy.min_samples {
            return None;
        }
        Some(match policy.too_few {
            TooFew::Wait => Verdict::Wait {
                have,
                need: policy.min_samples,
            },
            TooFew::Canaries => Verdict::Pass(format!(
                "{have} of {} samples, too few to judge it: live on its canaries (too-few=canaries)",
                policy.min_samples
            )),
        })
    }

    /// After measuring.
    pub fn judge(policy: &Policy, figures: &Figures) -> Verdict {
        if let Some(v) = Self::before(policy, figures.samples) {
            return v;
        }
        if figures.agreement() + 1e-9 < policy.min_agreement {
            Verdict::Hold(format!(
                "held by shadow evaluation: top-1 agreement {:.3} is below the policy's {} ({figures})",
                figures.agreement(),
                policy.min_agreement
            ))
        } else {
            Verdict::Pass(format!("shadow evaluation passed: {figures}"))
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Pass(why) | Verdict::Hold(why) => f.write_str(why),
            Verdict::Wait { have, need } => write!(
                f,
                "waiting for shadow samples: {have} of {need} recognitions of the shop's own cards"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair<'a>(active: Option<&'a str>, candidate: Option<&'a str>) -> Pair<'a> {
        Pair {
            active,
            active_score: 0.9,
            active_ms: 10.0,
            candidate,
            candidate_score: 0.8,
            candidate_ms: 20.0,
        }
    }

    #[test]
    fn a_policy_parses_from_the_operators_words_and_names_what_is_wrong() {
        let p: Policy = "min-agreement=0.9,min-samples=20".parse().unwrap();
        assert_eq!(
            p,
            Policy {
                min_agreement: 0.9,
                min_samples: 20,
                too_few: TooFew::Wait
            }
        );
        assert_eq!(p.to_string().parse::<Policy>().unwrap(), p);
        let c: Policy = "too-few=canaries".parse().unwrap();
        assert_eq!(c.too_few, TooFew::Canaries);
        assert_eq!(c.min_samples, 200);
        for (bad, says) in [
            ("min-agreement=1.5", "at most 1"),
            ("min-agreement=x", "not a number"),
            ("min-samples=0", "at least 1"),
            ("too-few=later", "wait or canaries"),
            ("agreement=0.9", "not a shadow policy setting"),
        ] {
            let e = bad.parse::<Policy>().unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn figures_count_agreement_changes_and_name_the_most_frequent_disagreements() {
        let pairs = [
            pair(Some("a"), Some("a")),
            pair(Some("b"), Some("c")),
            pair(Some("b"), Some("c")),
            pair(Some("d"), None),
            pair(None, None),
        ];
        let f = Figures::measure(&pairs);
        assert_eq!((f.samples, f.agreed, f.changed_card), (5, 2, 2));
        assert_eq!((f.uncertain_active, f.uncertain_candidate), (1, 2));
        assert!((f.agreement() - 0.4).abs() < 1e-9);
        assert!((f.mean_score_shift + 0.1).abs() < 1e-6);
        assert_eq!((f.candidate_ms, f.active_ms), (20.0, 10.0));
        assert_eq!(f.examples[0].count, 2);
        assert_eq!(f.examples[0].active.as_deref(), Some("b"));
        assert_eq!(f.examples[1].candidate, None);
        let text = f.to_string();
        assert!(
            text.contains("top-1 agreement 0.400 (2 of 5 samples)"),
            "{text}"
        );
        assert!(
            text.contains("e.g. b -> c (2x), d -> no card (1x)"),
            "{text}"
        );
    }

    #[test]
    fn the_verdict_holds_below_the_policy_and_waits_or_passes_on_too_few_samples() {
        let policy = Policy {
            min_agreement: 0.9,
            min_samples: 4,
            too_few: TooFew::Wait,
        };
        let good: Vec<_> = (0..4).map(|_| pair(Some("a"), Some("a"))).collect();
        assert!(matches!(
            Verdict::judge(&policy, &Figures::measure(&good)),
            Verdict::Pass(_)
        ));
        let mut bad = good.clone();
        bad[0] = pair(Some("a"), Some("b"));
        match Verdict::judge(&policy, &Figures::measure(&bad)) {
            Verdict::Hold(why) => assert!(why.contains("0.750 is below the policy's 0.9"), "{why}"),
            v => panic!("{v:?}"),
        }
        assert_eq!(
            Verdict::judge(&policy, &Figures::measure(&good[..3])),
            Verdict::Wait { have: 3, need: 4 }
        );
        let canaries = Policy {
            too_few: TooFew::Canaries,
            ..policy
        };
        assert!(matches!(
            Verdict::before(&canaries, 3),
            Some(Verdict::Pass(_))
        ));
        assert_eq!(Verdict::before(&canaries, 4), None);
    }
}
