//! Projection specs: `projections/*.toml`, one file per projection.
//!
//! A spec names the dimensions an aggregate keeps and the bucket sizes it
//! keeps them at. Everything that decides *which row an event lands in*
//! (dimensions, granularities, timezone) is hashed; a stored hash that differs
//! from the file's means the tables no longer match the spec, and Tally asks
//! for a rebuild instead of silently mixing two shapes in one table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono_tz::Tz;
use serde::Deserialize;

/// Errors of reading projection specs.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A spec file is malformed or inconsistent.
    #[error("projection spec {file}: {reason}")]
    InvalidSpec {
        /// The file.
        file: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// The specs directory cannot be read.
    #[error("cannot read projection specs from `{dir}`: {reason} (set --projections-dir / TALLY_PROJECTIONS_DIR)")]
    SpecDir {
        /// The directory.
        dir: String,
        /// The OS error.
        reason: String,
    },
}

/// A column an aggregate can group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    /// `api`
    Api,
    /// `endpoint`
    Endpoint,
    /// `method`
    Method,
    /// `key`
    Key,
    /// `user`
    User,
    /// `model`
    Model,
    /// `status` (the code as text, e.g. `'429'`)
    Status,
    /// `error_type` (`''` for successes)
    ErrorType,
    /// `cached` (`'true'` or `'false'`)
    Cached,
}

impl Dimension {
    /// Every dimension, in canonical order.
    pub const ALL: [Dimension; 9] = [
        Dimension::Api,
        Dimension::Endpoint,
        Dimension::Method,
        Dimension::Key,
        Dimension::User,
        Dimension::Model,
        Dimension::Status,
        Dimension::ErrorType,
        Dimension::Cached,
    ];

    /// The spec name, which is also the column name.
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Api => "api",
            Dimension::Endpoint => "endpoint",
            Dimension::Method => "method",
            Dimension::Key => "key",
            Dimension::User => "user",
            Dimension::Model => "model",
            Dimension::Status => "status",
            Dimension::ErrorType => "error_type",
            Dimension::Cached => "cached",
        }
    }

    /// Parses a spec or query name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// The column, quoted (`user` is reserved in PostgreSQL).
    pub fn column(self) -> String {
        format!("\"{}\"", self.as_str())
    }
}

/// A bucket size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Granularity {
    /// One minute (for alerts and rolling quotas).
    Minute,
    /// One hour of local time.
    Hour,
    /// One local calendar day (23, 24 or 25 hours around DST changes).
    Day,
    /// One local calendar month.
    Month,
}

impl Granularity {
    /// Every granularity, finest first.
    pub const ALL: [Granularity; 4] = [
        Granularity::Minute,
        Granularity::Hour,
        Granularity::Day,
        Granularity::Month,
    ];

    /// The spec name, which is also the table suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Month => "month",
        }
    }

    /// Parses a spec or query name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.as_str() == s)
    }
}

/// A set of a projection's tables folded and committed together, under a
/// checkpoint of their own: the minute and hour tables (`fine`, committed
/// within a second of the events) and the day and month tables (`coarse`,
/// committed every few seconds, so a busy group's day and month rows are
/// rewritten once per interval rather than once per commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// Minute and hour tables.
    Fine,
    /// Day and month tables.
    Coarse,
}

impl Tier {
    /// The tier whose tables hold `g`.
    pub fn of(g: Granularity) -> Tier {
        match g {
            Granularity::Minute | Granularity::Hour => Tier::Fine,
            Granularity::Day | Granularity::Month => Tier::Coarse,
        }
    }

    /// `fine` or `coarse`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Fine => "fine",
            Tier::Coarse => "coarse",
        }
    }
}

/// One tier of a projection: its checkpoint row and the spec of its tables
/// (the projection's spec with only the tier's granularities, whose hash
/// that checkpoint row stores).
#[derive(Debug, Clone, PartialEq)]
pub struct TierSpec {
    /// Which tier.
    pub tier: Tier,
    /// The checkpoint row's name: the projection's name for its finest tier,
    /// `<name>~coarse` for a coarse tier beside a fine one.
    pub state: String,
    /// The tier's tables.
    pub spec: Spec,
}

/// A validated projection spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// `[a-z][a-z0-9_]*`, at most 40 characters: part of every table name.
    pub name: String,
    /// Group-by columns, in the file's order (the table's column order).
    pub dimensions: Vec<Dimension>,
    /// Bucket sizes, finest first, without repeats.
    pub granularities: Vec<Granularity>,
    /// IANA zone that hour, day and month buckets follow.
    pub timezone: Tz,
    /// How long rows of a granularity are kept (absent: forever).
    pub retention: BTreeMap<Granularity, Duration>,
    /// The file it was read from (for messages).
    pub source: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    name: String,
    dimensions: Vec<String>,
    granularities: Vec<String>,
    #[serde(default = "utc")]
    timezone: String,
    #[serde(default)]
    retention: BTreeMap<String, String>,
}

fn utc() -> String {
    "UTC".to_string()
}

/// How far behind a minute table's retention the fold still writes its
/// rows: a restatement sums a coarser bucket from finer rows only that far
/// inside the retention (see `projection::restate`), so they must be there.
pub const FOLD_MARGIN: chrono::Duration = chrono::Duration::days(1);

impl Spec {
    /// The oldest bucket of `g` the fold writes at `now`, if any bound: a
    /// minute table with a retention gets no row older than its retention and
    /// [`FOLD_MARGIN`] (no query or alert reads it there, and the retention job
    /// would delete it), so a late or backfilled event costs no minute row.
    /// The bound follows `now`, so it only moves forward.
    pub fn fold_horizon(
        &self,
        g: Granularity,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        if g != Granularity::Minute {
            return None;
        }
        let keep = chrono::Duration::from_std(*self.retention.get(&g)?).ok()?;
        let oldest = now.checked_sub_signed(keep.checked_add(&FOLD_MARGIN)?)?;
        Some(crate::aggregate::bucket::bucket_start(
            oldest,
            Granularity::Minute,
            self.timezone,
        ))
    }

    /// Parses and validates one spec file's text.
    pub fn parse(text: &str, source: Option<&Path>) -> Result<Self, SpecError> {
        let invalid = |reason: String| SpecError::InvalidSpec {
            file: source.map(|p| p.display().to_string()).unwrap_or_default(),
            reason,
        };
        let file: SpecFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let name_ok = file.name.len() <= 40
            && file.name.starts_with(|c: char| c.is_ascii_lowercase())
            && file
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !name_ok {
            return Err(invalid(format!(
                "name `{}` must match [a-z][a-z0-9_]* and be at most 40 characters (it becomes part of table names)",
                file.name
            )));
        }
        let allowed_dims = Dimension::ALL.map(Dimension::as_str).join(", ");
        let mut dimensions = Vec::new();
        for d in &file.dimensions {
            let dim = Dimension::parse(d).ok_or_else(|| {
                invalid(format!("unknown dimension `{d}`; allowed: {allowed_dims}"))
            })?;
            if dimensions.contains(&dim) {
                return Err(invalid(format!("dimension `{d}` is listed twice")));
            }
            dimensions.push(dim);
        }
        let allowed_grans = Granularity::ALL.map(Granularity::as_str).join(", ");
        let mut granularities = Vec::new();
        for g in &file.granularities {
            let gran = Granularity::parse(g).ok_or_else(|| {
                invalid(format!(
                    "unknown granularity `{g}`; allowed: {allowed_grans}"
                ))
            })?;
            if granularities.contains(&gran) {
                return Err(invalid(format!("granularity `{g}` is listed twice")));
            }
            granularities.push(gran);
        }
        if granularities.is_empty() {
            return Err(invalid(format!(
                "granularities is empty; list at least one of {allowed_grans}"
            )));
        }
        granularities.sort();
        let timezone: Tz = file.timezone.parse().map_err(|_| {
            invalid(format!(
                "timezone `{}` is not an IANA zone name (e.g. `UTC`, `Europe/Berlin`, `Asia/Kolkata`)",
                file.timezone
            ))
        })?;
        let mut retention = BTreeMap::new();
        for (g, d) in &file.retention {
            let gran = Granularity::parse(g).ok_or_else(|| {
                invalid(format!(
                    "retention names unknown granularity `{g}`; allowed: {allowed_grans}"
                ))
            })?;
            if !granularities.contains(&gran) {
                return Err(invalid(format!(
                    "retention for `{g}`, which is not in granularities"
                )));
            }
            let dur = crate::duration::parse(d)
                .map_err(|e| invalid(format!("retention.{g} = `{d}`: {e} (e.g. `8d`, `36h`)")))?;
            retention.insert(gran, dur);
        }
        Ok(Spec {
            name: file.name,
            dimensions,
            granularities,
            timezone,
            retention,
            source: source.map(Path::to_path_buf),
        })
    }

    /// The canonical form of what decides row placement: dimensions (sorted),
    /// granularities and timezone. Retention is left out: changing it needs no rebuild.
    pub fn canonical(&self) -> String {
        let mut dims: Vec<&str> = self.dimensions.iter().map(|d| d.as_str()).collect();
        dims.sort_unstable();
        let grans: Vec<&str> = self.granularities.iter().map(|g| g.as_str()).collect();
        format!(
            "dimensions={};granularities={};timezone={}",
            dims.join(","),
            grans.join(","),
            self.timezone.name()
        )
    }

    /// A stable hash of [`Spec::canonical`] (FNV-1a, 64 bits, hex): stored with the
    /// checkpoint to detect a changed spec.
    pub fn hash(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.canonical().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// The table holding one granularity.
    pub fn table(&self, granularity: Granularity) -> String {
        table_name(&self.name, granularity)
    }

    /// The projection's tiers, finest first (one or two): see [`Tier`].
    pub fn tiers(&self) -> Vec<TierSpec> {
        let mut out: Vec<TierSpec> = Vec::new();
        for &g in &self.granularities {
            let tier = Tier::of(g);
            match out.iter_mut().find(|t| t.tier == tier) {
                Some(t) => t.spec.granularities.push(g),
                None => out.push(TierSpec {
                    tier,
                    state: tier_state(&self.name, tier, out.is_empty()),
                    spec: Spec {
                        granularities: vec![g],
                        retention: BTreeMap::new(),
                        ..self.clone()
                    },
                }),
            }
        }
        for t in &mut out {
            t.spec.retention = self
                .retention
                .iter()
                .filter(|(g, _)| Tier::of(**g) == t.tier)
                .map(|(g, d)| (*g, *d))
                .collect();
        }
        out
    }

    /// The checkpoint row whose `as_of` and cursor the table of `g` is at.
    pub fn checkpoint_of(&self, g: Granularity) -> String {
        let first = self.granularities.first().copied().map(Tier::of);
        let tier = Tier::of(g);
        tier_state(&self.name, tier, first.is_none_or(|f| f == tier))
    }

    /// The checkpoint rows of every tier.
    pub fn checkpoints(&self) -> Vec<String> {
        self.tiers().into_iter().map(|t| t.state).collect()
    }
}

/// The checkpoint row of `projection`'s `tier`: the projection's own name
/// for its finest tier, `<projection>~<tier>` for the other.
pub fn tier_state(projection: &str, tier: Tier, finest: bool) -> String {
    if finest {
        projection.to_string()
    } else {
        format!("{projection}~{}", tier.as_str())
    }
}

/// `agg_<projection>_<granularity>`.
pub fn table_name(projection: &str, granularity: Granularity) -> String {
    format!("agg_{projection}_{}", granularity.as_str())
}

/// Reads every `*.toml` in `dir`, sorted by file name. Names must be unique.
pub fn load_dir(dir: &Path) -> Result<Vec<Spec>, SpecError> {
    let entries = std::fs::read_dir(dir).map_err(|e| SpecError::SpecDir {
        dir: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    let mut specs: Vec<Spec> = Vec::with_capacity(paths.len());
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|e| SpecError::InvalidSpec {
            file: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let spec = Spec::parse(&text, Some(&path))?;
        if let Some(other) = specs.iter().find(|s| s.name == spec.name) {
            return Err(SpecError::InvalidSpec {
                file: path.display().to_string(),
                reason: format!(
                    "projection name `{}` is also used by {}",
                    spec.name,
                    other
                        .source
                        .as_deref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                ),
            });
        }
        specs.push(spec);
    }
    Ok(specs)
}

/// The specs shipped in `projections/`, built into the binary so `tally
/// serve` works from any directory (an installed binary, a systemd unit).
pub const BUILTIN: [(&str, &str); 4] = [
    (
        "alerts_minute.toml",
        include_str!("../../projections/alerts_minute.toml"),
    ),
    ("by_api.toml", include_str!("../../projections/by_api.toml")),
    ("by_key.toml", include_str!("../../projections/by_key.toml")),
    (
        "by_user.toml",
        include_str!("../../projections/by_user.toml"),
    ),
];

/// Where the projection specs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecSource {
    /// `*.toml` files in a directory, and whether it was set explicitly
    /// (`--projections-dir` / `TALLY_PROJECTIONS_DIR`) or found as `./projections`.
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Set by the operator (then it must exist).
        explicit: bool,
    },
    /// The shipped specs ([`BUILTIN`]).
    Builtin,
}

impl SpecSource {
    /// The directory that was set; else `./projections` when it exists; else
    /// the built-in specs. A set directory that does not exist is an error at
    /// [`SpecSource::load`], never a silent fallback.
    pub fn resolve(set: Option<&Path>) -> Self {
        match set {
            Some(dir) => Self::Dir {
                dir: dir.to_path_buf(),
                explicit: true,
            },
            None if Path::new("projections").is_dir() => Self::Dir {
                dir: PathBuf::from("projections"),
                explicit: false,
            },
            None => Self::Builtin,
        }
    }

    /// Reads and validates the specs.
    pub fn load(&self) -> Result<Vec<Spec>, SpecError> {
        match self {
            Self::Dir { dir, .. } => load_dir(dir),
            Self::Builtin => BUILTIN
                .iter()
                .map(|(file, text)| Spec::parse(text, Some(&Path::new("(built in)").join(file))))
                .collect(),
        }
    }
}

impl std::fmt::Display for SpecSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir {
                dir,
                explicit: true,
            } => write!(f, "directory {} (set by --projections-dir / TALLY_PROJECTIONS_DIR)", dir.display()),
            Self::Dir { dir, .. } => write!(f, "directory {} (found in the working directory)", dir.display()),
            Self::Builtin => f.write_str("the specs built into this binary (no TALLY_PROJECTIONS_DIR and no ./projections; `tally projections init DIR` writes them out for editing)"),
        }
    }
}

/// The specs of [`SpecSource::resolve`]`(set)`.
pub fn load_specs(set: Option<&Path>) -> Result<Vec<Spec>, SpecError> {
    SpecSource::resolve(set).load()
}

/// Writes the built-in specs into `dir` (created when missing) for editing;
/// refuses to overwrite or follow anything at a file's path (each file is
/// created new: a dangling symlink counts as there). When it stops partway,
/// the files it wrote are removed again, so "nothing was written" is true.
pub fn write_builtin(dir: &Path) -> Result<Vec<PathBuf>, SpecError> {
    use std::io::Write as _;
    let failed = |reason: String| SpecError::SpecDir {
        dir: dir.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| failed(e.to_string()))?;
    let mut written = Vec::new();
    for (file, text) in BUILTIN {
        let path = dir.join(file);
        let result = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut f| {
                written.push(path.clone());
                f.write_all(text.as_bytes())
            });
        if let Err(e) = result {
            for done in &written {
                let _ = std::fs::remove_file(done);
            }
            let reason = match e.kind() {
                std::io::ErrorKind::AlreadyExists => format!(
                    "{file} exists already; nothing was written (move it away or pick another directory)"
                ),
                _ => format!("{file}: {e}; nothing was written"),
            };
            return Err(failed(reason));
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_specs_are_the_shipped_files() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/projections"));
        let shipped = load_dir(dir).expect("shipped specs");
        let built_in = SpecSource::Builtin.load().expect("built-in specs");
        assert_eq!(
            shipped.len(),
            built_in.len(),
            "a spec file is missing from BUILTIN"
        );
        for (a, b) in shipped.iter().zip(&built_in) {
            assert_eq!(a.hash(), b.hash(), "{}", a.name);
        }
    }

    #[test]
    fn tiers_split_the_tables_by_cadence_and_name_their_checkpoints() {
        let specs = SpecSource::Builtin.load().expect("built-in specs");
        let by = |n: &str| specs.iter().find(|s| s.name == n).expect("spec").clone();
        let tiers = |s: &Spec| {
            s.tiers()
                .into_iter()
                .map(|t| (t.tier, t.state, t.spec.granularities))
                .collect::<Vec<_>>()
        };
        use Granularity::*;
        assert_eq!(
            tiers(&by("by_api")),
            vec![
                (Tier::Fine, "by_api".to_string(), vec![Hour]),
                (Tier::Coarse, "by_api~coarse".to_string(), vec![Day, Month]),
            ]
        );
        // Only day and month tables: the one tier keeps the projection's name
        // (and the whole spec's hash, so its checkpoint needs no upgrade).
        let by_user = by("by_user");
        assert_eq!(
            tiers(&by_user),
            vec![(Tier::Coarse, "by_user".to_string(), vec![Day, Month])]
        );
        assert_eq!(by_user.tiers()[0].spec.hash(), by_user.hash());
        let minute = by("alerts_minute");
        assert_eq!(minute.tiers()[0].spec.retention, minute.retention);
        let by_key = by("by_key");
        assert_eq!(by_key.checkpoint_of(Hour), "by_key");
        assert_eq!(by_key.checkpoint_of(Month), "by_key~coarse");
        assert_eq!(by_user.checkpoint_of(Day), "by_user");
        assert_eq!(by_key.checkpoints(), vec!["by_key", "by_key~coarse"]);
    }

    #[test]
    fn parses_the_documented_example() {
        let spec = Spec::parse(
            r#"name = "by_key"
dimensions = ["api", "key", "model"]
granularities = ["month", "hour", "day"]
timezone = "Europe/Berlin"
retention = { hour = "90d" }"#,
            None,
        )
        .expect("valid");
        assert_eq!(
            spec.granularities,
            vec![Granularity::Hour, Granularity::Day, Granularity::Month]
        );
        assert_eq!(spec.table(Granularity::Hour), "agg_by_key_hour");
        assert_eq!(
            spec.retention[&Granularity::Hour],
            Duration::from_secs(90 * 86400)
        );
        assert_eq!(spec.timezone.name(), "Europe/Berlin");
    }

    #[test]
    fn hash_ignores_dimension_order_and_retention_but_not_timezone() {
        let a = Spec::parse(
            "name='p'\ndimensions=['api','key']\ngranularities=['hour']",
            None,
        )
        .expect("a");
        let b = Spec::parse(
            "name='p'\ndimensions=['key','api']\ngranularities=['hour']\nretention={hour='1d'}",
            None,
        )
        .expect("b");
        let c = Spec::parse(
            "name='p'\ndimensions=['key','api']\ngranularities=['hour']\ntimezone='Asia/Kolkata'",
            None,
        )
        .expect("c");
        assert_eq!(a.hash(), b.hash());
        assert_ne!(a.hash(), c.hash());
    }

    #[test]
    fn rejects_bad_specs_with_a_reason() {
        for (text, needle) in [
            (
                "name='Bad'\ndimensions=[]\ngranularities=['hour']",
                "must match",
            ),
            (
                "name='p'\ndimensions=['colour']\ngranularities=['hour']",
                "unknown dimension `colour`",
            ),
            (
                "name='p'\ndimensions=['api']\ngranularities=['week']",
                "unknown granularity `week`",
            ),
            (
                "name='p'\ndimensions=['api']\ngranularities=[]",
                "granularities is empty",
            ),
            (
                "name='p'\ndimensions=['api']\ngranularities=['hour']\ntimezone='Mars/Olympus'",
                "IANA",
            ),
            (
                "name='p'\ndimensions=['api']\ngranularities=['hour']\nretention={minute='1d'}",
                "not in granularities",
            ),
            (
                "name='p'\ndimensions=['api','api']\ngranularities=['hour']",
                "twice",
            ),
            (
                "name='p'\ndimensions=['api']\ngranularities=['hour']\nextra=1",
                "unknown field",
            ),
        ] {
            let err = Spec::parse(text, None).expect_err(text).to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
