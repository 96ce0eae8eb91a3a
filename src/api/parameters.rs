//! The `managed.parameters` allow-list: which `postgresql.conf` settings a ServiceDatabase may set, and the CEL rules generated from it (pure, no I/O).
//!
//! Whoever may create a ServiceDatabase must not get more than a database out of it: a setting
//! that runs a shell command (`archive_command`), loads code (`local_preload_libraries`), names a
//! file, changes TLS, networking, authentication, replication or durability would turn the
//! operator into a confused deputy. So the list is an allow-list of ordinary tuning settings
//! (memory, planner, logging, statistics, autovacuum, timeouts, locks, locale and client
//! defaults), not a deny-list that every new Postgres release could outgrow.
//!
//! The same constants produce the CEL rules on the CRD (admission) and back
//! [`check_parameter`] (the controller's second line of defence, which also covers objects
//! stored before the rules existed). `shared_preload_libraries` is the one setting whose value
//! matters: admission accepts only plain library names, and the controller accepts only the
//! names the operator allows (`--allowed-preload-libraries`).

use kube::core::{Message, Rule};

/// Settings a ServiceDatabase may set, grouped as in the Postgres documentation. Settings that
/// exist only in some major versions are listed too; Postgres refuses unknown ones at start-up.
pub const ALLOWED_PARAMETERS: &[&str] = &[
    // Connections (limits and keepalives; never addresses, ports or sockets).
    "max_connections",
    "superuser_reserved_connections",
    "reserved_connections",
    "authentication_timeout",
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "tcp_user_timeout",
    "client_connection_check_interval",
    // Memory and resources.
    "shared_buffers",
    "huge_pages",
    "huge_page_size",
    "temp_buffers",
    "max_prepared_transactions",
    "work_mem",
    "hash_mem_multiplier",
    "maintenance_work_mem",
    "autovacuum_work_mem",
    "logical_decoding_work_mem",
    "max_stack_depth",
    "min_dynamic_shared_memory",
    "temp_file_limit",
    "max_files_per_process",
    "vacuum_buffer_usage_limit",
    "commit_timestamp_buffers",
    "multixact_member_buffers",
    "multixact_offset_buffers",
    "notify_buffers",
    "serializable_buffers",
    "subtransaction_buffers",
    "transaction_buffers",
    "vacuum_cost_delay",
    "vacuum_cost_page_hit",
    "vacuum_cost_page_miss",
    "vacuum_cost_page_dirty",
    "vacuum_cost_limit",
    "bgwriter_delay",
    "bgwriter_lru_maxpages",
    "bgwriter_lru_multiplier",
    "bgwriter_flush_after",
    "backend_flush_after",
    "effective_io_concurrency",
    "maintenance_io_concurrency",
    "io_combine_limit",
    "io_max_combine_limit",
    "io_workers",
    "max_worker_processes",
    "max_parallel_workers_per_gather",
    "max_parallel_maintenance_workers",
    "max_parallel_workers",
    "parallel_leader_participation",
    "old_snapshot_threshold",
    // Write-ahead log: throughput and checkpoint tuning only (no wal_level, archiving,
    // recovery, fsync or full_page_writes).
    "synchronous_commit",
    "wal_compression",
    "wal_buffers",
    "wal_writer_delay",
    "wal_writer_flush_after",
    "wal_skip_threshold",
    "wal_init_zero",
    "wal_recycle",
    "commit_delay",
    "commit_siblings",
    "checkpoint_timeout",
    "checkpoint_completion_target",
    "checkpoint_flush_after",
    "checkpoint_warning",
    "max_wal_size",
    "min_wal_size",
    "wal_keep_size",
    // A trade-off inside the instance (WAL kept for a stalled relay or connector against the
    // disk); the operator sets 1GB when logical decoding is on and this is not given.
    "max_slot_wal_keep_size",
    "wal_sender_timeout",
    // Planner.
    "enable_async_append",
    "enable_bitmapscan",
    "enable_distinct_reordering",
    "enable_gathermerge",
    "enable_group_by_reordering",
    "enable_hashagg",
    "enable_hashjoin",
    "enable_incremental_sort",
    "enable_indexonlyscan",
    "enable_indexscan",
    "enable_material",
    "enable_memoize",
    "enable_mergejoin",
    "enable_nestloop",
    "enable_parallel_append",
    "enable_parallel_hash",
    "enable_partition_pruning",
    "enable_partitionwise_aggregate",
    "enable_partitionwise_join",
    "enable_presorted_aggregate",
    "enable_self_join_elimination",
    "enable_seqscan",
    "enable_sort",
    "enable_tidscan",
    "seq_page_cost",
    "random_page_cost",
    "cpu_tuple_cost",
    "cpu_index_tuple_cost",
    "cpu_operator_cost",
    "parallel_setup_cost",
    "parallel_tuple_cost",
    "min_parallel_table_scan_size",
    "min_parallel_index_scan_size",
    "effective_cache_size",
    "jit",
    "jit_above_cost",
    "jit_inline_above_cost",
    "jit_optimize_above_cost",
    "geqo",
    "geqo_threshold",
    "geqo_effort",
    "geqo_pool_size",
    "geqo_generations",
    "geqo_selection_bias",
    "geqo_seed",
    "default_statistics_target",
    "constraint_exclusion",
    "cursor_tuple_fraction",
    "from_collapse_limit",
    "join_collapse_limit",
    "plan_cache_mode",
    "recursive_worktable_factor",
    // Logging: what and when, to the container's stderr (no collector, files or syslog).
    "log_min_messages",
    "log_min_error_statement",
    "log_min_duration_statement",
    "log_min_duration_sample",
    "log_statement_sample_rate",
    "log_transaction_sample_rate",
    "log_startup_progress_interval",
    "log_autovacuum_min_duration",
    "log_checkpoints",
    "log_connections",
    "log_disconnections",
    "log_duration",
    "log_error_verbosity",
    "log_hostname",
    "log_line_prefix",
    "log_lock_waits",
    "log_lock_failures",
    "log_recovery_conflict_waits",
    "log_parameter_max_length",
    "log_parameter_max_length_on_error",
    "log_statement",
    "log_replication_commands",
    "log_temp_files",
    "log_timezone",
    "cluster_name",
    "update_process_title",
    // Statistics.
    "track_activities",
    "track_activity_query_size",
    "track_counts",
    "track_io_timing",
    "track_wal_io_timing",
    "track_functions",
    "track_commit_timestamp",
    "track_cost_delay_timing",
    "compute_query_id",
    "stats_fetch_consistency",
    // Autovacuum and freezing.
    "autovacuum",
    "autovacuum_max_workers",
    "autovacuum_worker_slots",
    "autovacuum_naptime",
    "autovacuum_vacuum_threshold",
    "autovacuum_vacuum_max_threshold",
    "autovacuum_vacuum_insert_threshold",
    "autovacuum_analyze_threshold",
    "autovacuum_vacuum_scale_factor",
    "autovacuum_vacuum_insert_scale_factor",
    "autovacuum_analyze_scale_factor",
    "autovacuum_freeze_max_age",
    "autovacuum_multixact_freeze_max_age",
    "autovacuum_vacuum_cost_delay",
    "autovacuum_vacuum_cost_limit",
    "vacuum_freeze_min_age",
    "vacuum_freeze_table_age",
    "vacuum_multixact_freeze_min_age",
    "vacuum_multixact_freeze_table_age",
    "vacuum_failsafe_age",
    "vacuum_multixact_failsafe_age",
    "vacuum_truncate",
    "vacuum_max_eager_freeze_failure_rate",
    // Timeouts and locks.
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "transaction_timeout",
    "deadlock_timeout",
    "max_locks_per_transaction",
    "max_pred_locks_per_transaction",
    "max_pred_locks_per_relation",
    "max_pred_locks_per_page",
    // Client defaults, locale and formatting.
    "client_min_messages",
    "default_transaction_isolation",
    "default_transaction_deferrable",
    "default_toast_compression",
    "check_function_bodies",
    "bytea_output",
    "xmlbinary",
    "xmloption",
    "gin_pending_list_limit",
    "gin_fuzzy_search_limit",
    "datestyle",
    "intervalstyle",
    "timezone",
    "extra_float_digits",
    "client_encoding",
    "lc_messages",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "default_text_search_config",
    "icu_validation_level",
    "array_nulls",
    "escape_string_warning",
    "quote_all_identifiers",
    "synchronize_seqscans",
    "transform_null_equals",
    // Library preloading: admission accepts plain names only; the operator's
    // --allowed-preload-libraries decides which.
    SHARED_PRELOAD_LIBRARIES,
    // Settings of the contrib modules the default --allowed-preload-libraries permits (inert
    // unless the library is loaded).
    "pg_stat_statements.max",
    "pg_stat_statements.track",
    "pg_stat_statements.track_utility",
    "pg_stat_statements.track_planning",
    "pg_stat_statements.save",
    "auto_explain.log_min_duration",
    "auto_explain.log_parameter_max_length",
    "auto_explain.log_analyze",
    "auto_explain.log_buffers",
    "auto_explain.log_wal",
    "auto_explain.log_timing",
    "auto_explain.log_triggers",
    "auto_explain.log_verbose",
    "auto_explain.log_settings",
    "auto_explain.log_format",
    "auto_explain.log_level",
    "auto_explain.log_nested_statements",
    "auto_explain.sample_rate",
];

/// The one setting whose value is checked: which libraries load into every server process.
pub const SHARED_PRELOAD_LIBRARIES: &str = "shared_preload_libraries";

/// Settings the operator itself sets or that configure how the server is reached: never from a
/// spec. Any setting starting with `ssl` belongs here too (TLS is the operator's).
pub const OPERATOR_OWNED_PARAMETERS: &[&str] = &[
    "listen_addresses",
    "port",
    "data_directory",
    "config_file",
    "hba_file",
    "ident_file",
    "external_pid_file",
    "unix_socket_directories",
    "unix_socket_group",
    "unix_socket_permissions",
    "wal_level",
    "password_encryption",
];

/// Settings that load code into the server. Any setting ending in `_command` (shell commands:
/// `archive_command`, `restore_command`, `ssl_passphrase_command`, ...) belongs here too.
pub const CODE_LOADING_PARAMETERS: &[&str] = &[
    "local_preload_libraries",
    "session_preload_libraries",
    "dynamic_library_path",
    "jit_provider",
    "archive_library",
];

/// Why a parameter is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParameterRefusal {
    /// It runs a shell command or loads code.
    RunsCode,
    /// The operator owns it (networking, files, TLS, wal_level, password encryption).
    OperatorOwned,
    /// It is not on the allow-list.
    NotAllowed,
    /// `shared_preload_libraries` is not a comma-separated list of plain library names.
    NotPlainLibraryNames,
}

impl ParameterRefusal {
    /// Why, in the words of the admission message.
    pub fn explain(self) -> &'static str {
        match self {
            ParameterRefusal::RunsCode => RUNS_CODE_WHY,
            ParameterRefusal::OperatorOwned => OPERATOR_OWNED_WHY,
            ParameterRefusal::NotAllowed => NOT_ALLOWED_WHY,
            ParameterRefusal::NotPlainLibraryNames => PRELOAD_FORM_WHY,
        }
    }
}

const RUNS_CODE_WHY: &str = "settings that run shell commands or load code into the server (any *_command, local_preload_libraries, session_preload_libraries, dynamic_library_path, jit_provider, archive_library) are refused: they would run code as the postgres user for whoever may create a ServiceDatabase; shared_preload_libraries takes the libraries the operator allows";
const OPERATOR_OWNED_WHY: &str = "the operator sets these itself (addresses, ports, files, ssl*, wal_level, password_encryption)";
const NOT_ALLOWED_WHY: &str = "parameters may set only ordinary tuning settings (memory, planner, logging, statistics, autovacuum, timeouts, locks, locale and client defaults); settings that name files or change replication, durability, authentication or security checks are refused (the full list is in the README)";
const PRELOAD_FORM_WHY: &str = "shared_preload_libraries must be a comma-separated list of plain library names such as 'pg_stat_statements, auto_explain' (no paths); the operator's --allowed-preload-libraries decides which load";

/// Whether `key` may appear in `managed.parameters` (the value is checked only for
/// `shared_preload_libraries`, and only for its form; which libraries is the operator's call).
pub fn check_parameter(key: &str, value: &str) -> Result<(), ParameterRefusal> {
    if runs_code(key) {
        Err(ParameterRefusal::RunsCode)
    } else if operator_owned(key) {
        Err(ParameterRefusal::OperatorOwned)
    } else if !ALLOWED_PARAMETERS.contains(&key) {
        Err(ParameterRefusal::NotAllowed)
    } else if key == SHARED_PRELOAD_LIBRARIES && preload_library_names(value).is_none() {
        Err(ParameterRefusal::NotPlainLibraryNames)
    } else {
        Ok(())
    }
}

fn runs_code(key: &str) -> bool {
    key.ends_with("_command") || CODE_LOADING_PARAMETERS.contains(&key)
}

fn operator_owned(key: &str) -> bool {
    key.starts_with("ssl") || OPERATOR_OWNED_PARAMETERS.contains(&key)
}

/// The library names of a `shared_preload_libraries` value: plain names separated by commas
/// (spaces allowed around commas), or `None` when the value has any other form (paths,
/// `$libdir/...`, quotes). The empty value is the empty list. Same grammar as
/// [`PRELOAD_LIBRARIES_PATTERN`].
pub fn preload_library_names(value: &str) -> Option<Vec<&str>> {
    if value.is_empty() {
        return Some(Vec::new());
    }
    let parts: Vec<&str> = value.split(',').collect();
    let last = parts.len() - 1;
    let mut names = Vec::with_capacity(parts.len());
    for (i, part) in parts.into_iter().enumerate() {
        let part = if i > 0 {
            part.trim_start_matches(' ')
        } else {
            part
        };
        let part = if i < last {
            part.trim_end_matches(' ')
        } else {
            part
        };
        let mut chars = part.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        if !first_ok || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            return None;
        }
        names.push(part);
    }
    Some(names)
}

/// The CEL regular expression equal to [`preload_library_names`]' grammar (non-empty case).
pub const PRELOAD_LIBRARIES_PATTERN: &str = "^[a-z_][a-z0-9_]*( *, *[a-z_][a-z0-9_]*)*$";

fn cel_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("'{i}'")).collect();
    format!("[{}]", quoted.join(", "))
}

fn cel_set(items: &[&str]) -> String {
    let entries: Vec<String> = items.iter().map(|i| format!("'{i}': true")).collect();
    format!("{{{}}}", entries.join(", "))
}

fn cel_runs_code(k: &str) -> String {
    format!(
        "({k}.endsWith('_command') || {k} in {})",
        cel_list(CODE_LOADING_PARAMETERS)
    )
}

fn cel_operator_owned(k: &str) -> String {
    format!(
        "({k}.startsWith('ssl') || {k} in {})",
        cel_list(OPERATOR_OWNED_PARAMETERS)
    )
}

/// CEL rule: parameter names are lowercase letters, digits, `_` and `.`.
pub fn cel_name_rule() -> Rule {
    Rule::new("self.all(k, k.matches('^[a-z][a-z0-9_.]*$'))")
        .message("parameter names are lowercase letters, digits, '_' and '.'")
}

/// CEL rule: no setting that runs a command or loads code (its message names the first such key:
/// joining all of them exceeds the apiserver's CEL cost budget, as keys have no length bound).
pub fn cel_runs_code_rule() -> Rule {
    let code = cel_runs_code("k");
    Rule::new(format!("self.all(k, !{code})")).message(Message::Expression(format!(
        "'parameters may not set ' + self.filter(k, {code})[0] + ': {RUNS_CODE_WHY}'"
    )))
}

/// CEL rule: no setting the operator owns (unless already refused as running code).
pub fn cel_operator_owned_rule() -> Rule {
    let code = cel_runs_code("k");
    let owned = cel_operator_owned("k");
    Rule::new(format!("self.all(k, {code} || !{owned})")).message(Message::Expression(format!(
        "'parameters may not override keys the operator owns: ' + self.filter(k, !{code} && {owned})[0] + ' ({OPERATOR_OWNED_WHY})'"
    )))
}

/// CEL rule: every other key is on [`ALLOWED_PARAMETERS`] (its message names the first other).
pub fn cel_allowed_rule() -> Rule {
    let code = cel_runs_code("k");
    let owned = cel_operator_owned("k");
    let allowed = format!("k in {}", cel_set(ALLOWED_PARAMETERS));
    Rule::new(format!("self.all(k, {code} || {owned} || {allowed})")).message(
        Message::Expression(format!(
            "'parameters not allowed: ' + self.filter(k, !({code} || {owned} || {allowed}))[0] + '. {NOT_ALLOWED_WHY}'"
        )),
    )
}

/// CEL rule: `shared_preload_libraries` holds plain library names only.
pub fn cel_preload_form_rule() -> Rule {
    Rule::new(format!(
        "!('{SHARED_PRELOAD_LIBRARIES}' in self) || self['{SHARED_PRELOAD_LIBRARIES}'] == '' || self['{SHARED_PRELOAD_LIBRARIES}'].matches('{PRELOAD_LIBRARIES_PATTERN}')"
    ))
    .message(PRELOAD_FORM_WHY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reasons_can_be_embedded_in_cel_strings() {
        for why in [RUNS_CODE_WHY, OPERATOR_OWNED_WHY, NOT_ALLOWED_WHY] {
            assert!(!why.contains('\'') && !why.contains('\\'), "{why}");
        }
    }

    #[test]
    fn commands_and_code_loading_are_refused_before_anything_else() {
        for key in [
            "archive_command",
            "restore_command",
            "archive_cleanup_command",
            "recovery_end_command",
            "ssl_passphrase_command",
            "local_preload_libraries",
            "session_preload_libraries",
            "dynamic_library_path",
            "jit_provider",
            "archive_library",
        ] {
            assert_eq!(
                check_parameter(key, "x"),
                Err(ParameterRefusal::RunsCode),
                "{key}"
            );
        }
    }

    #[test]
    fn keys_the_operator_owns_are_refused() {
        for key in [
            "listen_addresses",
            "port",
            "hba_file",
            "ssl",
            "ssl_cert_file",
            "ssl_min_protocol_version",
            "wal_level",
            "password_encryption",
            "unix_socket_directories",
        ] {
            assert_eq!(
                check_parameter(key, "x"),
                Err(ParameterRefusal::OperatorOwned),
                "{key}"
            );
        }
    }

    #[test]
    fn dangerous_settings_are_not_on_the_allow_list() {
        for key in [
            "fsync",
            "full_page_writes",
            "search_path",
            "session_replication_role",
            "lo_compat_privileges",
            "allow_system_table_mods",
            "log_directory",
            "logging_collector",
            "primary_conninfo",
            "synchronous_standby_names",
            "max_replication_slots",
            "max_wal_senders",
            "archive_mode",
            "krb_server_keyfile",
            "zero_damaged_pages",
            "row_security",
            "default_tablespace",
            "createrole_self_grant",
            "event_triggers",
            "no_such_setting",
        ] {
            assert_eq!(
                check_parameter(key, "x"),
                Err(ParameterRefusal::NotAllowed),
                "{key}"
            );
        }
    }

    #[test]
    fn ordinary_tuning_settings_are_allowed() {
        for key in [
            "max_connections",
            "work_mem",
            "shared_buffers",
            "log_min_duration_statement",
            "autovacuum_naptime",
            "statement_timeout",
            "random_page_cost",
            "timezone",
            "max_slot_wal_keep_size",
        ] {
            assert_eq!(check_parameter(key, "1"), Ok(()), "{key}");
        }
    }

    #[test]
    fn the_allow_list_has_no_duplicates_and_no_refused_key() {
        let mut seen = std::collections::BTreeSet::new();
        for key in ALLOWED_PARAMETERS {
            assert!(seen.insert(key), "{key} listed twice");
            assert!(!runs_code(key) && !operator_owned(key), "{key}");
            assert!(
                key.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.'),
                "{key} would fail the CEL name rule"
            );
        }
    }

    #[test]
    fn shared_preload_libraries_accepts_plain_names_only() {
        assert_eq!(preload_library_names(""), Some(vec![]));
        assert_eq!(
            preload_library_names("pg_stat_statements"),
            Some(vec!["pg_stat_statements"])
        );
        assert_eq!(
            preload_library_names("pg_stat_statements, auto_explain"),
            Some(vec!["pg_stat_statements", "auto_explain"])
        );
        assert_eq!(preload_library_names("a ,b"), Some(vec!["a", "b"]));
        for bad in [
            "/tmp/evil.so",
            "$libdir/evil",
            "'pg_stat_statements'",
            " pg_stat_statements",
            "pg_stat_statements ",
            "a,,b",
            "a,",
            "Evil",
            "../x",
        ] {
            assert_eq!(preload_library_names(bad), None, "{bad}");
            assert_eq!(
                check_parameter(SHARED_PRELOAD_LIBRARIES, bad),
                Err(ParameterRefusal::NotPlainLibraryNames),
                "{bad}"
            );
        }
    }

    /// The rules on the generated CRD are built from the constants: the allow-list in the CRD is
    /// exactly [`ALLOWED_PARAMETERS`], and the refusal lists are exactly the Rust ones.
    #[test]
    fn the_crd_rules_list_exactly_the_rust_constants() {
        let crd = serde_json::to_value(crate::api::crds()[0].clone()).unwrap();
        let rules = crd
            .pointer("/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/instance/properties/managed/properties/parameters/x-kubernetes-validations")
            .and_then(|v| v.as_array())
            .expect("parameter rules on the CRD")
            .clone();
        let allow_rule = rules
            .iter()
            .filter_map(|r| r["rule"].as_str())
            .find(|r| r.contains("'max_connections': true"))
            .expect("the allow-list rule");
        let start = allow_rule.find("k in {").expect("set literal") + "k in {".len();
        let end = start + allow_rule[start..].find('}').expect("end of set");
        let listed: Vec<&str> = allow_rule[start..end]
            .split(", ")
            .map(|e| e.trim_end_matches(": true").trim_matches('\''))
            .collect();
        assert_eq!(listed, ALLOWED_PARAMETERS);
        for key in CODE_LOADING_PARAMETERS
            .iter()
            .chain(OPERATOR_OWNED_PARAMETERS)
        {
            assert!(
                rules.iter().any(|r| r["rule"]
                    .as_str()
                    .unwrap_or_default()
                    .contains(&format!("'{key}'"))),
                "{key} missing from the CRD rules"
            );
        }
        let form = rules
            .iter()
            .filter_map(|r| r["rule"].as_str())
            .find(|r| r.contains(&format!("self['{SHARED_PRELOAD_LIBRARIES}']")))
            .expect("the preload form rule");
        assert!(form.contains(PRELOAD_LIBRARIES_PATTERN));
    }
}
