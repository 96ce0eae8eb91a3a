//! The operator's guard rails: which instance images, preload libraries and external hosts a ServiceDatabase may use, parsed from the operator's flags (pure, no I/O).
//!
//! These are the operator's configuration, not the user's: whoever may create a ServiceDatabase
//! must not be able to make the operator run an arbitrary image, load an arbitrary library or
//! probe an arbitrary address on their behalf.
//!
//! Images (`--allowed-images`, comma-separated patterns). An image and every pattern are first
//! normalised the way container runtimes do: no registry means `docker.io`, `index.docker.io`
//! is `docker.io`, and a one-component Docker Hub name gets `library/` (`postgres` →
//! `docker.io/library/postgres`). Then:
//! - `REPOSITORY` allows exactly that repository, with any tag and/or digest (or none);
//! - `PREFIX/*` allows every repository under `PREFIX/` (`registry.internal/db/*`);
//! - `*` allows any image.
//!
//! Patterns carry no tag or digest (a tag pin would be bypassed by adding a digest, which the
//! runtime prefers). Image references that are not well-formed are never allowed.
//!
//! External hosts (`--allowed-external-hosts`, comma-separated; empty: unrestricted):
//! - `10.0.0.0/8`, `fd00::/8`: CIDRs; a single address (`10.1.2.3`) is a /32 (/128);
//! - `.db.internal` (or `*.db.internal`): any name ending in `.db.internal`;
//! - `pg.example.com`: exactly that name.
//!
//! A literal IP address (IPv4-mapped IPv6 counts as IPv4) is checked against the CIDRs only; a
//! name against the name entries only. Names are not resolved: an address looked up now need
//! not be the one connected to a moment later (DNS rebinding), so a name is allowed only by
//! a name entry, which the platform team controls. A name whose last label is numeric (`127.1`,
//! `2130706433`, `0x7f.1`) is refused whenever a restriction is set: it is not a DNS name, and
//! the resolver would read it as an IPv4 address.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Every guard rail the controllers apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardRails {
    /// Images managed instances may run.
    pub allowed_images: ImagePolicy,
    /// Libraries `shared_preload_libraries` may name.
    pub allowed_preload_libraries: PreloadPolicy,
    /// Hosts external instances may name.
    pub allowed_external_hosts: HostPolicy,
}

impl Default for GuardRails {
    fn default() -> Self {
        GuardRails {
            allowed_images: DEFAULT_ALLOWED_IMAGES
                .parse()
                .unwrap_or(ImagePolicy { patterns: vec![] }),
            allowed_preload_libraries: DEFAULT_ALLOWED_PRELOAD_LIBRARIES
                .parse()
                .unwrap_or(PreloadPolicy { libraries: vec![] }),
            allowed_external_hosts: HostPolicy::default(),
        }
    }
}

/// Default of `--allowed-images`: the official Postgres image, any tag or digest.
pub const DEFAULT_ALLOWED_IMAGES: &str = "postgres";
/// Default of `--allowed-preload-libraries`: two contrib modules of the official image that
/// only observe (statement statistics and plan logging).
pub const DEFAULT_ALLOWED_PRELOAD_LIBRARIES: &str = "pg_stat_statements,auto_explain";

/// A flag value that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(String);

/// A Docker-normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    /// `registry/path`, lowercase registry (`docker.io/library/postgres`).
    pub repository: String,
    /// The tag, if any.
    pub tag: Option<String>,
    /// The digest (`sha256:…`), if any.
    pub digest: Option<String>,
}

impl FromStr for ImageReference {
    type Err = PolicyError;

    fn from_str(image: &str) -> Result<Self, Self::Err> {
        let bad =
            |why: &str| PolicyError(format!("{image:?} is not a valid image reference: {why}"));
        let (name_tag, digest) = match image.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (image, None),
        };
        if let Some(d) = digest {
            let (algo, hex) = d.split_once(':').ok_or_else(|| bad("malformed digest"))?;
            let algo_ok = !algo.is_empty()
                && algo
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c));
            if !algo_ok || hex.len() < 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad("malformed digest"));
            }
        }
        let (name, tag) = match name_tag.rfind(':') {
            Some(i) if !name_tag[i..].contains('/') => (&name_tag[..i], Some(&name_tag[i + 1..])),
            _ => (name_tag, None),
        };
        if let Some(t) = tag {
            let mut chars = t.chars();
            let first_ok = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            if !first_ok
                || t.len() > 128
                || !chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            {
                return Err(bad("malformed tag"));
            }
        }
        let repository = normalise_repository(name, true).map_err(|why| bad(&why))?;
        Ok(ImageReference {
            repository,
            tag: tag.map(str::to_owned),
            digest: digest.map(str::to_owned),
        })
    }
}

/// `registry/path` with Docker's defaults; `library_prefix` adds `library/` to one-component
/// Docker Hub names (not for `PREFIX/*` patterns, where `acme/*` means `docker.io/acme/*`).
fn normalise_repository(name: &str, library_prefix: bool) -> Result<String, String> {
    if name.is_empty() || name.len() > 255 {
        return Err("empty or longer than 255 characters".to_owned());
    }
    let components: Vec<&str> = name.split('/').collect();
    let first = components[0];
    let has_registry = components.len() > 1
        && (first.contains('.') || first.contains(':') || first == "localhost");
    let (registry, path) = if has_registry {
        (first.to_ascii_lowercase(), &components[1..])
    } else {
        ("docker.io".to_owned(), &components[..])
    };
    let registry = if registry == "index.docker.io" || registry == "registry-1.docker.io" {
        "docker.io".to_owned()
    } else {
        registry
    };
    if has_registry && !valid_registry(&registry) {
        return Err(format!("malformed registry {registry:?}"));
    }
    for c in path {
        if !valid_path_component(c) {
            return Err(format!("malformed path component {c:?}"));
        }
    }
    let mut path = path.join("/");
    if library_prefix && registry == "docker.io" && !path.contains('/') {
        path = format!("library/{path}");
    }
    Ok(format!("{registry}/{path}"))
}

fn valid_registry(registry: &str) -> bool {
    let (host, port) = match registry.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (registry, None),
    };
    let host_ok = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.chars().all(|c| c.is_ascii_digit()));
    host_ok && port_ok
}

/// A path component: lowercase letters and digits, separated by single `.`, `_`, `__` or runs
/// of `-`.
fn valid_path_component(c: &str) -> bool {
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if alnum(b) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__` or one or more `-`.
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.chars().all(|ch| ch == '-');
        if !ok {
            return false;
        }
    }
    true
}

/// One `--allowed-images` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImagePattern {
    /// `*`: any image.
    Any,
    /// Exactly this normalised repository.
    Repository(String),
    /// Every repository starting with this (ends with `/`).
    Prefix(String),
}

impl ImagePattern {
    fn matches(&self, image: &ImageReference) -> bool {
        match self {
            ImagePattern::Any => true,
            ImagePattern::Repository(r) => image.repository == *r,
            ImagePattern::Prefix(p) => image.repository.starts_with(p.as_str()),
        }
    }
}

impl fmt::Display for ImagePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImagePattern::Any => f.write_str("*"),
            ImagePattern::Repository(r) => f.write_str(r),
            ImagePattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// The images managed instances may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePolicy {
    patterns: Vec<ImagePattern>,
}

impl FromStr for ImagePolicy {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut patterns = Vec::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = |why: String| PolicyError(format!("--allowed-images entry {entry:?}: {why}"));
            let pattern = if entry == "*" {
                ImagePattern::Any
            } else if let Some(prefix) = entry.strip_suffix("/*") {
                let normalised = normalise_repository(prefix, false).map_err(bad)?;
                // `registry.internal/*` names a registry only: `docker.io/registry.internal`
                // would be the wrong reading.
                let registry_only = !prefix.contains('/')
                    && (prefix.contains('.') || prefix.contains(':') || prefix == "localhost");
                ImagePattern::Prefix(if registry_only {
                    format!("{}/", prefix.to_ascii_lowercase())
                } else {
                    format!("{normalised}/")
                })
            } else {
                if entry.contains('@') || entry.rsplit('/').next().is_some_and(|l| l.contains(':'))
                {
                    return Err(bad(
                        "patterns name repositories without a tag or digest (a tag pin is bypassed by adding a digest)".to_owned(),
                    ));
                }
                ImagePattern::Repository(normalise_repository(entry, true).map_err(bad)?)
            };
            patterns.push(pattern);
        }
        if patterns.is_empty() {
            return Err(PolicyError(
                "--allowed-images needs at least one pattern (`*` allows any image)".to_owned(),
            ));
        }
        Ok(ImagePolicy { patterns })
    }
}

impl ImagePolicy {
    /// Whether `image` may run; the error is the user-facing message.
    pub fn check(&self, image: &str) -> Result<(), String> {
        let reference: ImageReference = image.parse().map_err(|e: PolicyError| e.0)?;
        if self.patterns.iter().any(|p| p.matches(&reference)) {
            Ok(())
        } else {
            Err(format!(
                "image {image:?} ({}) is not allowed by the operator's --allowed-images ({}); use an allowed image or ask the platform team",
                reference.repository, self
            ))
        }
    }
}

impl fmt::Display for ImagePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.patterns.iter().map(ToString::to_string).collect();
        f.write_str(&list.join(", "))
    }
}

/// The libraries `shared_preload_libraries` may name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PreloadPolicy {
    libraries: Vec<String>,
}

impl FromStr for PreloadPolicy {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut libraries = Vec::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if crate::api::parameters::preload_library_names(entry).is_none_or(|n| n.len() != 1) {
                return Err(PolicyError(format!(
                    "--allowed-preload-libraries entry {entry:?} is not a plain library name"
                )));
            }
            libraries.push(entry.to_owned());
        }
        Ok(PreloadPolicy { libraries })
    }
}

impl PreloadPolicy {
    /// Whether every library of a `shared_preload_libraries` value is allowed.
    pub fn check(&self, value: &str) -> Result<(), String> {
        let Some(names) = crate::api::parameters::preload_library_names(value) else {
            return Err(format!(
                "shared_preload_libraries {value:?}: {}",
                crate::api::parameters::ParameterRefusal::NotPlainLibraryNames.explain()
            ));
        };
        let refused: Vec<&str> = names
            .into_iter()
            .filter(|n| !self.libraries.iter().any(|l| l == n))
            .collect();
        if refused.is_empty() {
            return Ok(());
        }
        let allowed = if self.libraries.is_empty() {
            "none".to_owned()
        } else {
            self.libraries.join(", ")
        };
        Err(format!(
            "shared_preload_libraries may load only the libraries the operator's --allowed-preload-libraries allows ({allowed}); not allowed: {}",
            refused.join(", ")
        ))
    }
}

/// A CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn contains(&self, addr: IpAddr) -> bool {
        match (self.network, canonical_ip(addr)) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// IPv4-mapped IPv6 (`::ffff:10.0.0.1`) is the IPv4 address it maps.
fn canonical_ip(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// One `--allowed-external-hosts` name entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NameRule {
    /// Exactly this name.
    Exact(String),
    /// Names ending in this (starts with `.`).
    Suffix(String),
}

impl fmt::Display for NameRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameRule::Exact(n) | NameRule::Suffix(n) => f.write_str(n),
        }
    }
}

/// The hosts external instances may name; unrestricted by default.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostPolicy {
    cidrs: Vec<Cidr>,
    names: Vec<NameRule>,
}

impl FromStr for HostPolicy {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut policy = HostPolicy::default();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad =
                |why: &str| PolicyError(format!("--allowed-external-hosts entry {entry:?}: {why}"));
            if let Some((addr, prefix)) = entry.split_once('/') {
                let network: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
                let network = canonical_ip(network);
                let max = if network.is_ipv4() { 32 } else { 128 };
                let prefix: u8 = prefix
                    .parse()
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(|| bad("prefix length out of range"))?;
                policy.cidrs.push(Cidr { network, prefix });
            } else if let Ok(addr) = entry.parse::<IpAddr>() {
                let network = canonical_ip(addr);
                let prefix = if network.is_ipv4() { 32 } else { 128 };
                policy.cidrs.push(Cidr { network, prefix });
            } else {
                let name = entry.to_ascii_lowercase();
                let (suffix, bare) = match name.strip_prefix("*.") {
                    Some(rest) => (true, rest.to_owned()),
                    None => match name.strip_prefix('.') {
                        Some(rest) => (true, rest.to_owned()),
                        None => (false, name.clone()),
                    },
                };
                if !valid_dns_name(&bare) {
                    return Err(bad("not a CIDR, an IP address or a DNS name"));
                }
                policy.names.push(if suffix {
                    NameRule::Suffix(format!(".{bare}"))
                } else {
                    NameRule::Exact(bare)
                });
            }
        }
        Ok(policy)
    }
}

fn valid_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        && !numeric_last_label(name)
}

/// A last label that is all digits or `0x…` hex: the resolver reads such a "name" as an IPv4
/// address (`127.1`, `2130706433`, `0x7f.1`).
fn numeric_last_label(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    let hex = last
        .strip_prefix("0x")
        .is_some_and(|h| h.chars().all(|c| c.is_ascii_hexdigit()));
    hex || (!last.is_empty() && last.chars().all(|c| c.is_ascii_digit()))
}

impl HostPolicy {
    /// Whether no restriction is configured.
    pub fn is_unrestricted(&self) -> bool {
        self.cidrs.is_empty() && self.names.is_empty()
    }

    /// Whether `host` (an `external.host`) may be connected to; the error is the user-facing
    /// message. Never resolves names.
    pub fn check(&self, host: &str) -> Result<(), String> {
        if self.is_unrestricted() {
            return Ok(());
        }
        let host_lc = host.to_ascii_lowercase();
        let allowed = match host_lc.parse::<IpAddr>() {
            Ok(addr) => self.cidrs.iter().any(|c| c.contains(addr)),
            Err(_) if numeric_last_label(&host_lc) => {
                return Err(format!(
                    "external.host {host:?} is not allowed: it is neither a DNS name nor an IP address in standard form (write IPv4 addresses as four decimal numbers)"
                ));
            }
            Err(_) => self.names.iter().any(|n| match n {
                NameRule::Exact(e) => host_lc == *e,
                NameRule::Suffix(s) => host_lc.ends_with(s.as_str()),
            }),
        };
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "external.host {host:?} is not allowed by the operator's --allowed-external-hosts ({}); the operator did not connect to it",
                self.describe()
            ))
        }
    }

    fn describe(&self) -> String {
        let mut items: Vec<String> = self.cidrs.iter().map(ToString::to_string).collect();
        items.extend(self.names.iter().map(ToString::to_string));
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(s: &str) -> ImagePolicy {
        s.parse().unwrap()
    }

    #[test]
    fn images_are_normalised_like_a_container_runtime_does() {
        for (image, repo) in [
            ("postgres", "docker.io/library/postgres"),
            ("postgres:17", "docker.io/library/postgres"),
            ("library/postgres:17-alpine", "docker.io/library/postgres"),
            ("docker.io/postgres:17", "docker.io/library/postgres"),
            ("docker.io/library/postgres", "docker.io/library/postgres"),
            (
                "index.docker.io/library/postgres:16",
                "docker.io/library/postgres",
            ),
            (
                "Registry.Internal:5000/db/postgres:17",
                "registry.internal:5000/db/postgres",
            ),
            ("localhost/postgres", "localhost/postgres"),
            ("acme/postgres", "docker.io/acme/postgres"),
        ] {
            let r: ImageReference = image.parse().unwrap();
            assert_eq!(r.repository, repo, "{image}");
        }
        let pinned: ImageReference = format!("postgres:17@sha256:{}", "a".repeat(64))
            .parse()
            .unwrap();
        assert_eq!(pinned.tag.as_deref(), Some("17"));
        assert!(pinned.digest.is_some());
    }

    #[test]
    fn the_default_allows_the_official_postgres_image_with_any_tag_or_digest() {
        let p = GuardRails::default().allowed_images;
        for ok in [
            "postgres",
            "postgres:17",
            "postgres:17.2-bookworm",
            "library/postgres:16",
            "docker.io/library/postgres:15",
            "docker.io/postgres:18",
            "index.docker.io/library/postgres:14",
            &format!("postgres@sha256:{}", "0".repeat(64)),
            &format!("postgres:17@sha256:{}", "f".repeat(64)),
        ] {
            assert_eq!(p.check(ok), Ok(()), "{ok}");
        }
        for refused in [
            "evil.example/postgres:17",
            "evil.example/library/postgres:17",
            "ghcr.io/library/postgres",
            "acme/postgres:17",
            "postgres-evil:17",
            "postgresql:17",
            "docker.io/library/postgres/evil:17",
            "localhost/postgres",
            "postgres:17 ; rm -rf /",
            "POSTGRES:17",
            "docker.io/library/../postgres",
            "",
        ] {
            let err = p.check(refused).unwrap_err();
            assert!(
                err.contains("not allowed") || err.contains("not a valid image reference"),
                "{refused}: {err}"
            );
        }
    }

    #[test]
    fn prefix_patterns_allow_a_registry_or_an_organisation() {
        let p = images("registry.internal/db/*, ghcr.io/*, acme/*");
        for ok in [
            "registry.internal/db/postgres:17",
            "registry.internal/db/team/postgres",
            "ghcr.io/anyone/postgres:1",
            "acme/postgres",
            "docker.io/acme/pg:1",
        ] {
            assert_eq!(p.check(ok), Ok(()), "{ok}");
        }
        for refused in [
            "registry.internal/dbx/postgres",
            "registry.internal/postgres",
            "registry.internal.evil.example/db/postgres",
            "postgres",
            "acmex/postgres",
        ] {
            assert!(p.check(refused).is_err(), "{refused}");
        }
        assert_eq!(images("*").check("anything.example/x:1"), Ok(()));
    }

    #[test]
    fn image_patterns_with_tags_or_digests_or_nothing_are_rejected_at_start_up() {
        for bad in [
            "postgres:17",
            "postgres@sha256:abc",
            ",",
            "",
            "UPPER/x",
            "a//b",
        ] {
            assert!(bad.parse::<ImagePolicy>().is_err(), "{bad:?}");
        }
        assert!(
            "registry.internal:5000/postgres"
                .parse::<ImagePolicy>()
                .is_ok()
        );
    }

    #[test]
    fn the_refusal_names_the_image_and_the_allowed_patterns() {
        let err = GuardRails::default()
            .allowed_images
            .check("evil.example/pg:1")
            .unwrap_err();
        assert!(err.contains("evil.example/pg:1"), "{err}");
        assert!(err.contains("docker.io/library/postgres"), "{err}");
        assert!(err.contains("--allowed-images"), "{err}");
    }

    #[test]
    fn preload_libraries_must_be_in_the_operators_list() {
        let p = GuardRails::default().allowed_preload_libraries;
        assert_eq!(p.check("pg_stat_statements"), Ok(()));
        assert_eq!(p.check("pg_stat_statements, auto_explain"), Ok(()));
        assert_eq!(p.check(""), Ok(()));
        let err = p
            .check("pg_stat_statements,basebackup_to_shell")
            .unwrap_err();
        assert!(err.contains("not allowed: basebackup_to_shell"), "{err}");
        assert!(p.check("/tmp/evil.so").is_err());
        let none: PreloadPolicy = "".parse().unwrap();
        let err = none.check("pg_stat_statements").unwrap_err();
        assert!(err.contains("(none)"), "{err}");
        assert!("$libdir/x".parse::<PreloadPolicy>().is_err());
    }

    #[test]
    fn hosts_are_unrestricted_by_default() {
        let p = HostPolicy::default();
        assert!(p.is_unrestricted());
        assert_eq!(p.check("127.0.0.1"), Ok(()));
        assert_eq!(p.check("anything"), Ok(()));
    }

    #[test]
    fn literal_addresses_are_checked_against_cidrs_only() {
        let p: HostPolicy = "10.0.0.0/8, 192.168.1.7, fd00::/8, .db.internal"
            .parse()
            .unwrap();
        for ok in ["10.1.2.3", "192.168.1.7", "fd00::1", "::ffff:10.9.9.9"] {
            assert_eq!(p.check(ok), Ok(()), "{ok}");
        }
        for refused in [
            "11.0.0.1",
            "192.168.1.8",
            "127.0.0.1",
            "::1",
            "fe80::1",
            "169.254.169.254",
        ] {
            let err = p.check(refused).unwrap_err();
            assert!(err.contains("--allowed-external-hosts"), "{err}");
        }
    }

    #[test]
    fn names_are_checked_against_name_entries_without_resolving() {
        let p: HostPolicy = "10.0.0.0/8, .db.internal, *.rds.amazonaws.com, pg.example.com"
            .parse()
            .unwrap();
        for ok in [
            "a.db.internal",
            "A.B.DB.INTERNAL",
            "x.eu-west-1.rds.amazonaws.com",
            "pg.example.com",
        ] {
            assert_eq!(p.check(ok), Ok(()), "{ok}");
        }
        for refused in [
            "db.internal",
            "evildb.internal",
            "a.db.internal.evil.example",
            "x.pg.example.com",
            "localhost",
            "metadata.google.internal",
        ] {
            assert!(p.check(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn numeric_names_that_resolvers_read_as_addresses_are_refused() {
        let p: HostPolicy = ".internal, 10.0.0.0/8".parse().unwrap();
        for trick in ["127.1", "2130706433", "0x7f.1", "0x7f000001", "10.1"] {
            let err = p.check(trick).unwrap_err();
            assert!(err.contains("standard form"), "{trick}: {err}");
        }
    }

    #[test]
    fn malformed_host_entries_are_rejected_at_start_up() {
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "nonsense/8",
            "bad_name",
            "127.1",
            "-a.b",
        ] {
            assert!(bad.parse::<HostPolicy>().is_err(), "{bad}");
        }
        assert!("".parse::<HostPolicy>().unwrap().is_unrestricted());
    }
}
