//! Price changes: validation (every problem names the field to fix), the
//! `PUT`/`DELETE`/list operations over [`crate::store::prices`] (which audits
//! each change and queues the restatement of the buckets it reprices), and
//! the import formats: Tally's own (TOML or JSON) and LiteLLM's
//! `model_prices_and_context_window.json`. The price model and the cost rule
//! itself are [`crate::aggregate::price`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::aggregate::price::Price;
use crate::event::cost::{format_nanos_short, parse_nanos};
use crate::store::prices::{NewPrice, PriceRow, PutOutcome};
use crate::store::{Store, StoreError};

/// Most prices in one `PUT` or import.
pub const MAX_PRICES_PER_CHANGE: usize = 10_000;
/// Longest `model`, `api` or `id`, in characters.
pub const MAX_NAME_CHARS: usize = 256;

/// Errors of a price change.
#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    /// The request is malformed; the message names what to fix.
    #[error("{0}")]
    Invalid(String),
    /// No such price.
    #[error("no price `{0}`")]
    NotFound(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(msg: impl Into<String>) -> PriceError {
    PriceError::Invalid(msg.into())
}

/// A decimal amount: a JSON string (`"0.15"`) or number (kept as its exact
/// source text, never a float).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Amount {
    /// `"0.15"`.
    Text(String),
    /// `0.15`, read from its source text.
    #[schema(value_type = f64)]
    Number(serde_json::Number),
}

impl Amount {
    fn text(&self) -> String {
        match self {
            Amount::Text(t) => t.clone(),
            Amount::Number(n) => n.to_string(),
        }
    }
}

/// One price as sent (`PUT /v1/prices`, an import file).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceInput {
    /// The price's id: given, it updates that price (or creates it under
    /// this id); left out, the price is matched by (api, model, effective_from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Only calls to this api (left out: any api).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// The model (the event's `model`, exactly).
    pub model: String,
    /// RFC 3339: the price applies from then until the next one of the same (api, model).
    pub effective_from: String,
    /// Per million input tokens, currency units, at most 9 fractional digits.
    #[schema(example = "0.15")]
    pub input_per_mtok: Amount,
    /// Per million output tokens.
    #[schema(example = "0.60")]
    pub output_per_mtok: Amount,
    /// Per million input tokens of calls with `cached: true` (left out: `input_per_mtok`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "0.075")]
    pub cached_input_per_mtok: Option<Amount>,
    /// Per request, on top of the token prices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "0.001")]
    pub per_request: Option<Amount>,
}

/// A stored price as answered.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct PriceOut {
    /// Its id (for `DELETE /v1/prices/{id}`).
    pub id: String,
    /// The api it is narrowed to (`null`: any).
    pub api: Option<String>,
    /// The model.
    pub model: String,
    /// From when it applies (RFC 3339, UTC).
    pub effective_from: String,
    /// When the next price of the same (api, model) takes over (`null`: none yet).
    pub effective_to: Option<String>,
    /// Per million input tokens (shortest exact decimal).
    pub input_per_mtok: String,
    /// Per million output tokens.
    pub output_per_mtok: String,
    /// Per million cached input tokens (`null`: the input price applies).
    pub cached_input_per_mtok: Option<String>,
    /// Per request (`null`: none).
    pub per_request: Option<String>,
    /// Last change.
    pub updated_at: String,
    /// Who made it.
    pub updated_by: String,
}

/// RFC 3339 in UTC with the precision the instant has.
pub fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// The answers for stored rows, with each one's `effective_to`.
pub fn answers(rows: &[PriceRow]) -> Vec<PriceOut> {
    let mut next: BTreeMap<(&str, &str), Vec<DateTime<Utc>>> = BTreeMap::new();
    for r in rows {
        next.entry((r.price.api.as_str(), r.price.model.as_str()))
            .or_default()
            .push(r.price.effective_from);
    }
    for v in next.values_mut() {
        v.sort();
    }
    rows.iter()
        .map(|r| {
            let p = &r.price;
            let to = next
                .get(&(p.api.as_str(), p.model.as_str()))
                .and_then(|v| v.iter().find(|t| **t > p.effective_from))
                .copied();
            PriceOut {
                id: r.id.clone(),
                api: (!p.api.is_empty()).then(|| p.api.clone()),
                model: p.model.clone(),
                effective_from: time(p.effective_from),
                effective_to: to.map(time),
                input_per_mtok: format_nanos_short(p.input),
                output_per_mtok: format_nanos_short(p.output),
                cached_input_per_mtok: p.cached_input.map(format_nanos_short),
                per_request: p.per_request.map(format_nanos_short),
                updated_at: time(r.updated_at),
                updated_by: r.updated_by.clone(),
            }
        })
        .collect()
}

fn name(field: &str, v: &str) -> Result<(), PriceError> {
    if v.trim().is_empty() {
        return Err(invalid(format!("`{field}` must not be empty")));
    }
    if v.chars().count() > MAX_NAME_CHARS {
        return Err(invalid(format!(
            "`{field}` is longer than {MAX_NAME_CHARS} characters"
        )));
    }
    if v.chars().any(char::is_control) {
        return Err(invalid(format!("`{field}` contains a control character")));
    }
    Ok(())
}

fn amount(at: &str, field: &str, v: &Amount) -> Result<i64, PriceError> {
    let text = v.text();
    parse_nanos(&text).map_err(|e| {
        invalid(format!(
            "{at}`{field}`: {} (a decimal amount in currency units, e.g. \"0.15\")",
            e.replace("cost must be", "prices must be")
        ))
    })
}

/// Validates one price; `at` prefixes messages (`prices[3]: `).
pub fn validate(at: &str, p: &PriceInput) -> Result<NewPrice, PriceError> {
    if let Some(id) = &p.id {
        name(&format!("{at}id"), id)?;
    }
    name(&format!("{at}model"), &p.model)?;
    let api = match &p.api {
        Some(a) => {
            name(&format!("{at}api"), a)?;
            a.clone()
        }
        None => String::new(),
    };
    let effective_from = DateTime::parse_from_rfc3339(&p.effective_from)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            invalid(format!(
                "{at}`effective_from` `{}` is not an RFC 3339 time ({e}); e.g. 2026-11-01T00:00:00Z",
                p.effective_from
            ))
        })?;
    // Stored with microsecond precision, as event timestamps are.
    let micros = effective_from.timestamp_micros();
    let effective_from = DateTime::from_timestamp_micros(micros).unwrap_or(effective_from);
    Ok(NewPrice {
        id: p.id.clone(),
        price: Price {
            api,
            model: p.model.clone(),
            effective_from,
            input: amount(at, "input_per_mtok", &p.input_per_mtok)?,
            output: amount(at, "output_per_mtok", &p.output_per_mtok)?,
            cached_input: p
                .cached_input_per_mtok
                .as_ref()
                .map(|v| amount(at, "cached_input_per_mtok", v))
                .transpose()?,
            per_request: p
                .per_request
                .as_ref()
                .map(|v| amount(at, "per_request", v))
                .transpose()?,
        },
    })
}

/// Validates a batch: each price, the batch size, and that no two prices of
/// the batch share an id or an (api, model, effective_from).
pub fn validate_all(inputs: &[PriceInput]) -> Result<Vec<NewPrice>, PriceError> {
    if inputs.is_empty() {
        return Err(invalid(
            "no prices given: send one price object or a non-empty array",
        ));
    }
    if inputs.len() > MAX_PRICES_PER_CHANGE {
        return Err(invalid(format!(
            "{} prices in one change; at most {MAX_PRICES_PER_CHANGE} are allowed",
            inputs.len()
        )));
    }
    let many = inputs.len() > 1;
    let mut out = Vec::with_capacity(inputs.len());
    let mut seen: HashMap<(String, String, DateTime<Utc>), usize> = HashMap::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    for (i, p) in inputs.iter().enumerate() {
        let at = if many {
            format!("prices[{i}]: ")
        } else {
            String::new()
        };
        let v = validate(&at, p)?;
        let key = (
            v.price.api.clone(),
            v.price.model.clone(),
            v.price.effective_from,
        );
        if let Some(j) = seen.insert(key, i) {
            return Err(invalid(format!(
                "prices[{j}] and prices[{i}] have the same api, model and effective_from ({}, {}, {}); one price per (api, model) may start at an instant",
                if v.price.api.is_empty() { "any api" } else { &v.price.api },
                v.price.model,
                time(v.price.effective_from)
            )));
        }
        if let Some(id) = &v.id {
            if let Some(j) = ids.insert(id.clone(), i) {
                return Err(invalid(format!(
                    "prices[{j}] and prices[{i}] have the same id `{id}`"
                )));
            }
        }
        out.push(v);
    }
    Ok(out)
}

/// What a `PUT` did.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct PutAnswer {
    /// The prices as stored now, in request order.
    pub prices: Vec<PriceOut>,
    /// Prices created.
    pub created: usize,
    /// Prices changed.
    pub updated: usize,
    /// Prices sent exactly as stored (nothing done).
    pub unchanged: usize,
    /// Restatements queued (per projection and range) to reprice events already folded.
    pub restatements: usize,
}

/// Records price changes and wakes the restater.
#[derive(Debug, Clone)]
pub struct Pricer {
    store: Store,
    wake: Option<Arc<tokio::sync::Notify>>,
}

impl Pricer {
    /// A pricer over `store`; `wake` (when serving) starts the restater at once.
    pub fn new(store: Store, wake: Option<Arc<tokio::sync::Notify>>) -> Self {
        Self { store, wake }
    }

    fn woken(&self, restatements: usize) {
        if restatements > 0 {
            if let Some(w) = &self.wake {
                w.notify_one();
            }
        }
    }

    /// Creates or updates prices (idempotent: a price sent as stored changes nothing).
    pub async fn put(&self, inputs: &[PriceInput], actor: &str) -> Result<PutAnswer, PriceError> {
        let valid = validate_all(inputs)?;
        match self.store.prices().put(&valid, actor).await? {
            PutOutcome::Invalid(msg) => Err(PriceError::Invalid(msg)),
            PutOutcome::Done(done) => {
                self.woken(done.restatements);
                let all = self.store.prices().list().await?;
                let out = answers(&all);
                let prices = done
                    .ids
                    .iter()
                    .filter_map(|id| out.iter().find(|p| &p.id == id).cloned())
                    .collect();
                Ok(PutAnswer {
                    prices,
                    created: done.created,
                    updated: done.updated,
                    unchanged: done.unchanged,
                    restatements: done.restatements,
                })
            }
        }
    }

    /// Deletes a price; events it priced fall back to the price before it
    /// (or become unpriced) and are restated.
    pub async fn delete(&self, id: &str, actor: &str) -> Result<PriceOut, PriceError> {
        let all = self.store.prices().list().await?;
        let Some(before) = answers(&all).into_iter().find(|p| p.id == id) else {
            return Err(PriceError::NotFound(id.to_string()));
        };
        match self.store.prices().delete(id, actor).await? {
            Some(restatements) => {
                self.woken(restatements);
                Ok(before)
            }
            None => Err(PriceError::NotFound(id.to_string())),
        }
    }

    /// Stored prices, filtered: `model`, `api` (`""` is not a filter), and
    /// `at` (only the price in effect then, per (api, model)).
    pub async fn list(
        &self,
        model: Option<&str>,
        api: Option<&str>,
        at: Option<DateTime<Utc>>,
    ) -> Result<Vec<PriceOut>, PriceError> {
        let mut rows = self.store.prices().list().await?;
        let all = answers(&rows);
        let mut keep: Vec<bool> = rows
            .iter()
            .map(|r| {
                model.is_none_or(|m| r.price.model == m) && api.is_none_or(|a| r.price.api == a)
            })
            .collect();
        if let Some(at) = at {
            for (k, (r, o)) in keep.iter_mut().zip(rows.iter().zip(&all)) {
                let ends_after = o
                    .effective_to
                    .as_deref()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .is_none_or(|t| t > at);
                *k = *k && r.price.effective_from <= at && ends_after;
            }
        }
        let mut out: Vec<PriceOut> = all
            .into_iter()
            .zip(keep)
            .filter_map(|(o, k)| k.then_some(o))
            .collect();
        rows.clear();
        out.sort_by(|a, b| {
            (&a.model, &a.api, &a.effective_from).cmp(&(&b.model, &b.api, &b.effective_from))
        });
        Ok(out)
    }

    /// Queues the restatement of every projection over `[from, now]`
    /// (`model`: only that model's events change, but whole buckets are
    /// restated). Returns the restatements queued.
    pub async fn reprice(
        &self,
        from: DateTime<Utc>,
        model: Option<&str>,
        actor: &str,
    ) -> Result<usize, PriceError> {
        let n = self.store.prices().reprice(from, model, actor).await?;
        self.woken(n);
        Ok(n)
    }
}

/// Counts of a LiteLLM conversion.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LitellmReport {
    /// Entries converted to prices.
    pub converted: usize,
    /// Entries without token prices (image, audio, embedding-by-character…), skipped.
    pub skipped_no_token_price: usize,
    /// Entries whose prices have more digits than a nano-unit per million tokens, skipped.
    pub skipped_too_precise: usize,
}

/// A per-token price (`1.5e-07`) as per million tokens, exactly (the
/// decimal point moves six places; no float).
fn per_mtok(v: &serde_json::Value) -> Option<Result<Amount, String>> {
    let text = match v {
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::String(s) => s.trim().to_string(),
        _ => return None,
    };
    let scaled = match text.find(['e', 'E']) {
        Some(pos) => match text[pos + 1..].parse::<i32>() {
            Ok(exp) => format!("{}e{}", &text[..pos], exp + 6),
            Err(_) => return Some(Err(format!("`{text}` is not a number"))),
        },
        None => format!("{text}e6"),
    };
    Some(parse_nanos(&scaled).map(|n| Amount::Text(format_nanos_short(n))))
}

/// Converts LiteLLM's `model_prices_and_context_window.json` into prices
/// effective from `effective_from` (optionally narrowed to `api`). Entries
/// without both `input_cost_per_token` and `output_cost_per_token` are
/// skipped and counted, as are those whose prices are too precise.
pub fn from_litellm(
    json: &str,
    effective_from: DateTime<Utc>,
    api: Option<&str>,
) -> Result<(Vec<PriceInput>, LitellmReport), PriceError> {
    let doc: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| invalid(format!("not a LiteLLM price file (JSON): {e}")))?;
    let obj = doc.as_object().ok_or_else(|| {
        invalid("not a LiteLLM price file: the top level must be an object of models")
    })?;
    let mut report = LitellmReport::default();
    let mut out = Vec::new();
    for (model, entry) in obj {
        // The file documents its own fields under this key.
        if model == "sample_spec" {
            continue;
        }
        let field = |f: &str| entry.get(f).and_then(per_mtok);
        let (Some(input), Some(output)) = (
            field("input_cost_per_token"),
            field("output_cost_per_token"),
        ) else {
            report.skipped_no_token_price += 1;
            continue;
        };
        let cached = field("cache_read_input_token_cost");
        let (Ok(input), Ok(output)) = (input, output) else {
            report.skipped_too_precise += 1;
            continue;
        };
        let cached = match cached {
            Some(Ok(c)) => Some(c),
            Some(Err(_)) => {
                report.skipped_too_precise += 1;
                continue;
            }
            None => None,
        };
        out.push(PriceInput {
            id: None,
            api: api.map(str::to_string),
            model: model.clone(),
            effective_from: time(effective_from),
            input_per_mtok: input,
            output_per_mtok: output,
            cached_input_per_mtok: cached,
            per_request: None,
        });
        report.converted += 1;
    }
    Ok((out, report))
}

/// A Tally price file: JSON (one price, an array, or `{"prices": [...]}`) or
/// TOML (`[[prices]]` tables).
pub fn from_tally_file(text: &str) -> Result<Vec<PriceInput>, PriceError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        prices: Vec<PriceInput>,
    }
    let trimmed = text.trim_start();
    // `[[prices]]` starts like a JSON array: JSON is whatever parses as JSON.
    let json = (trimmed.starts_with('{') || trimmed.starts_with('['))
        && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
    if json {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Json {
            File(File),
            Many(Vec<PriceInput>),
            One(PriceInput),
        }
        // Untagged errors say nothing useful: try each shape for its message.
        return match serde_json::from_str::<Json>(text) {
            Ok(Json::File(f)) => Ok(f.prices),
            Ok(Json::Many(v)) => Ok(v),
            Ok(Json::One(p)) => Ok(vec![p]),
            Err(_) => {
                let e = if trimmed.starts_with('[') {
                    serde_json::from_str::<Vec<PriceInput>>(text).err()
                } else if serde_json::from_str::<serde_json::Value>(text)
                    .ok()
                    .is_some_and(|v| v.get("prices").is_some())
                {
                    serde_json::from_str::<File>(text).err()
                } else {
                    serde_json::from_str::<PriceInput>(text).err()
                };
                Err(invalid(format!(
                    "not a Tally price file: {}",
                    e.map_or("unrecognised shape".into(), |e| e.to_string())
                )))
            }
        };
    }
    toml::from_str::<File>(text)
        .map(|f| f.prices)
        .map_err(|e| invalid(format!("not a Tally price file (TOML `[[prices]]`): {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("valid")
            .with_timezone(&Utc)
    }

    #[test]
    fn litellm_per_token_prices_convert_exactly() {
        let json = r#"{
            "sample_spec": {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0},
            "gpt-4o-mini": {"input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07, "cache_read_input_token_cost": 7.5e-08},
            "claude": {"input_cost_per_token": 0.000003, "output_cost_per_token": 0.000015},
            "dall-e-3": {"output_cost_per_pixel": 0.0, "mode": "image_generation"},
            "tiny": {"input_cost_per_token": 1e-18, "output_cost_per_token": 0}
        }"#;
        let (prices, report) =
            from_litellm(json, t("2026-01-01T00:00:00Z"), None).expect("converts");
        assert_eq!(
            report,
            LitellmReport {
                converted: 2,
                skipped_no_token_price: 1,
                skipped_too_precise: 1
            }
        );
        let mini = prices
            .iter()
            .find(|p| p.model == "gpt-4o-mini")
            .expect("mini");
        assert_eq!(mini.input_per_mtok, Amount::Text("0.15".into()));
        assert_eq!(mini.output_per_mtok, Amount::Text("0.6".into()));
        assert_eq!(
            mini.cached_input_per_mtok,
            Some(Amount::Text("0.075".into()))
        );
        let claude = prices.iter().find(|p| p.model == "claude").expect("claude");
        assert_eq!(claude.input_per_mtok, Amount::Text("3".into()));
        assert_eq!(claude.output_per_mtok, Amount::Text("15".into()));
    }

    #[test]
    fn bad_prices_say_what_to_fix() {
        let base = PriceInput {
            id: None,
            api: None,
            model: "m".into(),
            effective_from: "2026-01-01T00:00:00Z".into(),
            input_per_mtok: Amount::Text("1".into()),
            output_per_mtok: Amount::Text("2".into()),
            cached_input_per_mtok: None,
            per_request: None,
        };
        let err = |p: PriceInput| validate_all(&[p]).expect_err("invalid").to_string();
        assert!(err(PriceInput {
            input_per_mtok: Amount::Text("-1".into()),
            ..base.clone()
        })
        .contains("`input_per_mtok`: `-1` is negative"));
        assert!(err(PriceInput {
            output_per_mtok: Amount::Text("0.0000000001".into()),
            ..base.clone()
        })
        .contains("10 fractional digits"));
        assert!(err(PriceInput {
            effective_from: "yesterday".into(),
            ..base.clone()
        })
        .contains("effective_from"));
        assert!(err(PriceInput {
            model: " ".into(),
            ..base.clone()
        })
        .contains("`model` must not be empty"));
        let twice = validate_all(&[base.clone(), base.clone()]).expect_err("overlap");
        assert!(
            twice.to_string().contains("prices[0] and prices[1]"),
            "{twice}"
        );
        assert!(validate_all(&[]).is_err());
        assert!(from_tally_file(r#"{"model": "m", "effective_from": "2026-01-01T00:00:00Z", "input_per_mtok": "1", "output_per_mtok": "1", "colour": "red"}"#)
            .expect_err("unknown field")
            .to_string()
            .contains("colour"));
    }

    #[test]
    fn tally_files_in_toml_and_json() {
        let toml = r#"
[[prices]]
model = "gpt-4o-mini"
effective_from = "2026-01-01T00:00:00Z"
input_per_mtok = "0.15"
output_per_mtok = "0.60"
"#;
        assert_eq!(from_tally_file(toml).expect("toml").len(), 1);
        let json = r#"[{"model": "a", "effective_from": "2026-01-01T00:00:00Z", "input_per_mtok": 0.1, "output_per_mtok": "1"}]"#;
        let v = from_tally_file(json).expect("json");
        assert_eq!(validate_all(&v).expect("valid")[0].price.input, 100_000_000);
    }
}
