//! The price model and the cost rule, without I/O: a [`Price`], the
//! [`Catalog`] the projector looks prices up in, and the [`Charge`] of one
//! event. The rule (see README, "Prices"): an event that carries `cost`
//! keeps it; one without gets `tokens_in × input (cached_input when cached) +
//! tokens_out × output + per_request` from the price in effect at its `ts`
//! (an (api, model) price wins over a model-only one), rounded half to even
//! to a nano-unit once per event; one with no matching price costs 0 and is
//! counted as `unpriced`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::event::Event;

/// Tokens per price unit: token prices are per million tokens.
const TOKENS_PER_UNIT: i128 = 1_000_000;

/// How an event's cost was found (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// The emitter sent `cost` (nano-units).
    Sent(i64),
    /// Computed from the catalog (nano-units).
    Catalog(i64),
    /// No `cost` and no price in effect: costs 0.
    Unpriced,
}

impl Charge {
    /// The cost counted, in nano-units.
    pub fn nanos(self) -> i64 {
        match self {
            Charge::Sent(n) | Charge::Catalog(n) => n,
            Charge::Unpriced => 0,
        }
    }
}

/// One price, amounts in nano-units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    /// `""`: any api.
    pub api: String,
    /// The model.
    pub model: String,
    /// From when it applies.
    pub effective_from: DateTime<Utc>,
    /// Per million input tokens.
    pub input: i64,
    /// Per million output tokens.
    pub output: i64,
    /// Per million input tokens of a cached call (`None`: `input`).
    pub cached_input: Option<i64>,
    /// Per request.
    pub per_request: Option<i64>,
}

/// `n / d` rounded half to even (`d > 0`, `n ≥ 0`).
fn div_half_even(n: i128, d: i128) -> i128 {
    let (q, r) = (n / d, n % d);
    match (2 * r).cmp(&d) {
        std::cmp::Ordering::Less => q,
        std::cmp::Ordering::Greater => q + 1,
        std::cmp::Ordering::Equal => q + (q & 1),
    }
}

impl Price {
    /// The cost of one call in nano-units, rounded half to even once;
    /// saturates at `i64::MAX` (about 9.2 billion currency units).
    pub fn cost(&self, tokens_in: i64, tokens_out: i64, cached: bool) -> i64 {
        let input = if cached {
            self.cached_input.unwrap_or(self.input)
        } else {
            self.input
        };
        let tokens = i128::from(tokens_in.max(0)) * i128::from(input)
            + i128::from(tokens_out.max(0)) * i128::from(self.output);
        let total =
            div_half_even(tokens, TOKENS_PER_UNIT) + i128::from(self.per_request.unwrap_or(0));
        i64::try_from(total).unwrap_or(i64::MAX)
    }
}

/// The prices of one model: model-only ones and per api, each sorted by
/// `effective_from`.
#[derive(Debug, Clone, Default)]
struct ModelPrices {
    any: Vec<Price>,
    by_api: HashMap<String, Vec<Price>>,
}

fn in_effect(prices: &[Price], ts: DateTime<Utc>) -> Option<&Price> {
    let i = prices.partition_point(|p| p.effective_from <= ts);
    i.checked_sub(1).map(|i| &prices[i])
}

/// The catalog as the projector uses it: lookups by (api, model, ts).
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    models: HashMap<String, ModelPrices>,
}

impl Catalog {
    /// A catalog of these prices.
    pub fn new(prices: impl IntoIterator<Item = Price>) -> Self {
        let mut models: HashMap<String, ModelPrices> = HashMap::new();
        for p in prices {
            let m = models.entry(p.model.clone()).or_default();
            if p.api.is_empty() {
                m.any.push(p);
            } else {
                m.by_api.entry(p.api.clone()).or_default().push(p);
            }
        }
        for m in models.values_mut() {
            m.any.sort_by_key(|p| p.effective_from);
            for v in m.by_api.values_mut() {
                v.sort_by_key(|p| p.effective_from);
            }
        }
        Self { models }
    }

    /// Whether there are no prices.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The price in effect for a call of `model` on `api` at `ts`: the
    /// (api, model) one if one is in effect, else the model-only one.
    pub fn price_at(&self, api: &str, model: &str, ts: DateTime<Utc>) -> Option<&Price> {
        let m = self.models.get(model)?;
        m.by_api
            .get(api)
            .and_then(|v| in_effect(v, ts))
            .or_else(|| in_effect(&m.any, ts))
    }

    /// The cost rule for one event.
    pub fn charge(&self, e: &Event) -> Charge {
        if let Some(c) = e.cost_nanos {
            return Charge::Sent(c);
        }
        let price = e
            .model
            .as_deref()
            .and_then(|model| self.price_at(&e.api, model, e.ts));
        match price {
            Some(p) => Charge::Catalog(p.cost(
                e.tokens_in.unwrap_or(0),
                e.tokens_out.unwrap_or(0),
                e.cached,
            )),
            None => Charge::Unpriced,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("valid")
            .with_timezone(&Utc)
    }
    fn price(api: &str, from: &str, input: i64, output: i64) -> Price {
        Price {
            api: api.into(),
            model: "m".into(),
            effective_from: t(from),
            input,
            output,
            cached_input: None,
            per_request: None,
        }
    }

    #[test]
    fn rounds_half_to_even_once_per_event() {
        assert_eq!(div_half_even(5, 10), 0);
        assert_eq!(div_half_even(15, 10), 2);
        assert_eq!(div_half_even(25, 10), 2);
        assert_eq!(div_half_even(26, 10), 3);
        assert_eq!(div_half_even(14, 10), 1);
        // 1 token at 0.0000005/Mtok... = 0.5 nano → 0; 3 tokens = 1.5 → 2.
        let p = Price {
            input: 500_000 / 1_000, // 0.0005 units per Mtok = 500 nano-units per Mtok
            ..price("", "2026-01-01T00:00:00Z", 0, 0)
        };
        assert_eq!(p.input, 500);
        assert_eq!(p.cost(1_000, 0, false), 0); // 0.5 nano
        assert_eq!(p.cost(3_000, 0, false), 2); // 1.5 nano
        assert_eq!(p.cost(5_000, 0, false), 2); // 2.5 nano
    }

    #[test]
    fn cached_input_price_and_per_request_apply() {
        let p = Price {
            cached_input: Some(75_000_000),
            per_request: Some(1_000_000),
            ..price("", "2026-01-01T00:00:00Z", 150_000_000, 600_000_000)
        };
        // 1000 × 0.15/M + 500 × 0.6/M + 0.001 = 0.00015 + 0.0003 + 0.001
        assert_eq!(p.cost(1_000, 500, false), 150_000 + 300_000 + 1_000_000);
        assert_eq!(p.cost(1_000, 500, true), 75_000 + 300_000 + 1_000_000);
        assert_eq!(p.cost(i64::MAX, i64::MAX, false), i64::MAX);
    }

    #[test]
    fn api_price_wins_while_in_effect_and_versions_follow_effective_from() {
        let c = Catalog::new([
            price("", "2026-01-01T00:00:00Z", 1, 0),
            price("", "2026-02-01T00:00:00Z", 2, 0),
            price("azure", "2026-01-15T00:00:00Z", 10, 0),
        ]);
        let at = |api: &str, ts: &str| c.price_at(api, "m", t(ts)).map(|p| p.input);
        assert_eq!(at("openai", "2025-12-31T23:59:59Z"), None);
        assert_eq!(at("openai", "2026-01-01T00:00:00Z"), Some(1));
        assert_eq!(at("openai", "2026-02-01T00:00:00Z"), Some(2));
        assert_eq!(at("azure", "2026-01-10T00:00:00Z"), Some(1));
        assert_eq!(at("azure", "2026-01-15T00:00:00Z"), Some(10));
        assert_eq!(at("azure", "2026-03-01T00:00:00Z"), Some(10));
        assert_eq!(
            c.price_at("openai", "other", t("2026-03-01T00:00:00Z")),
            None
        );
    }
}
