use super::*;

#[test]
fn builtin_policy_is_valid() {
    let p = Policy::builtin().unwrap();
    assert!(p.problems().is_empty(), "{:?}", p.problems());
    for k in SymptomKind::ALL {
        let observe_only = matches!(
            k,
            SymptomKind::ServerUnhealthy
                | SymptomKind::AllServersDown
                | SymptomKind::CaExpiring
                | SymptomKind::IdentityNotIssued
                | SymptomKind::BootstrapBundleStale
        );
        assert_eq!(p.ladder(k).is_empty(), observe_only, "ladder for {k}");
    }
}

#[test]
fn problems_are_listed() {
    let mut p = Policy::builtin().unwrap();
    p.thresholds.rotation_overdue_open = 1.5;
    p.thresholds.expiring_close = 0.99;
    p.ladders.insert("nonsense".into(), vec![]);
    p.guards.futile_after = 0;
    let problems = p.problems();
    assert_eq!(problems.len(), 4, "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("futile_after")));
}

#[test]
fn agent_svid_ttl_is_learned_unless_the_policy_sets_it() {
    let learned = AgentTtl {
        ttl: Duration::from_secs(599),
        source: TtlSource::Learned,
    };
    let p = Policy::builtin().unwrap();
    assert_eq!(p.thresholds.agent_svid_ttl, None);
    assert_eq!(p.thresholds.agent_ttl(Some(learned)), Some(learned));
    assert_eq!(p.thresholds.agent_ttl(None), None);
    // Policies written before the TTL was learned still load, and their
    // value wins.
    let text = DEFAULT_POLICY.replace("[thresholds]\n", "[thresholds]\nagent_svid_ttl = \"1h\"\n");
    let p = Policy::from_toml(&text, "p.toml").unwrap();
    assert_eq!(
        p.thresholds.agent_ttl(Some(learned)),
        Some(AgentTtl {
            ttl: Duration::from_secs(3600),
            source: TtlSource::Policy
        })
    );
    let zero = DEFAULT_POLICY.replace("[thresholds]\n", "[thresholds]\nagent_svid_ttl = \"0s\"\n");
    let p = Policy::from_toml(&zero, "p.toml").unwrap();
    assert_eq!(p.problems().len(), 1, "{:?}", p.problems());
}

#[test]
fn unknown_policy_key_is_rejected() {
    let text = DEFAULT_POLICY.replace("[guards]", "[guards]\nbudget = 3");
    assert!(Policy::from_toml(&text, "p.toml").is_err());
}

#[test]
fn safety_controls_default_to_approval_off_demotion_and_blast_radius_on() {
    let builtin = Policy::builtin().unwrap();
    // A policy written before these keys existed gets the same defaults.
    let old = Policy::from_toml(
        "[thresholds]\n\
         rotation_overdue_open = 0.65\nrotation_overdue_close = 0.6\n\
         expiring_open = 0.85\nexpiring_close = 0.8\n\
         unreachable_after = \"0s\"\nmax_staleness = \"10s\"\n\
         [guards]\ncooldown = \"20s\"\nbudget_per_hour = 30\n",
        "old.toml",
    )
    .unwrap();
    for p in [&builtin, &old] {
        let g = &p.guards;
        assert_eq!(g.max_concurrent_actions, 4);
        assert_eq!(g.approval, ApprovalGuard::default());
        assert!(g.approval.classes.is_empty());
        assert_eq!(p.approval_expiry(), Duration::from_secs(900));
        assert_eq!(g.demotion, DemotionGuard::default());
        assert!(g.demotion.enabled);
        assert_eq!((g.demotion.window, g.demotion.min_success_ratio), (5, 0.4));
        assert_eq!(g.blast_radius, BlastRadius::default());
        assert!(g.blast_radius.enabled);
        assert_eq!(g.blast_radius.agents, Limit::Percent(25.0));
        assert_eq!(g.blast_radius.per_server, Limit::Percent(50.0));
        assert_eq!(g.blast_radius.per_peer, Limit::Count(1));
        assert!(p.maintenance.is_empty());
        assert!(p.ladders.values().flatten().all(|r| r.approval.is_none()));
    }
}

#[test]
fn approval_by_rung_then_by_class() {
    let mut p = Policy::builtin().unwrap();
    p.guards.approval.classes = vec![Class::AgentLocal];
    let rung = |approval| Rung {
        actuator: "restart-agent".into(),
        timeout: Duration::from_secs(1),
        verify_within: Duration::from_secs(1),
        cooldown: None,
        approval,
    };
    for (approval, class, want) in [
        (None, Class::AgentLocal, true),
        (None, Class::Failover, false),
        (None, Class::Gentle, false),
        (Some(ApprovalMode::Required), Class::Gentle, true),
        (Some(ApprovalMode::NotRequired), Class::AgentLocal, false),
    ] {
        assert_eq!(
            p.needs_approval(&rung(approval), class),
            want,
            "{approval:?} {class:?}"
        );
    }
    let text = DEFAULT_POLICY.replace(
        "actuator = \"evict-agent\"\n",
        "actuator = \"evict-agent\"\napproval = \"required\"\n",
    );
    let p = Policy::from_toml(&text, "p.toml").unwrap();
    assert_eq!(
        p.ladder(SymptomKind::AgentBanned)[0].approval,
        Some(ApprovalMode::Required)
    );
    let text = DEFAULT_POLICY.replace("classes = []", "classes = [\"agent_local\", \"failover\"]");
    let p = Policy::from_toml(&text, "p.toml").unwrap();
    assert_eq!(
        p.guards.approval.classes,
        [Class::AgentLocal, Class::Failover]
    );
    for bad in ["approval = \"maybe\"", "classes = [\"drastic\"]"] {
        let text = DEFAULT_POLICY.replace("classes = []", bad);
        assert!(Policy::from_toml(&text, "p.toml").is_err(), "{bad}");
    }
}

#[test]
fn limits_are_counts_or_percentages() {
    let parse = |v: &str| {
        let text = DEFAULT_POLICY.replace("agents = \"25%\"", &format!("agents = {v}"));
        Policy::from_toml(&text, "p.toml").map(|p| p.guards.blast_radius.agents)
    };
    assert_eq!(parse("2").unwrap(), Limit::Count(2));
    assert_eq!(parse("\"10%\"").unwrap(), Limit::Percent(10.0));
    assert_eq!(parse("\" 12.5 % \"").unwrap(), Limit::Percent(12.5));
    for bad in ["-1", "\"25\"", "\"a%\"", "2.5", "true"] {
        assert!(parse(bad).is_err(), "{bad}");
    }
    // (limit, group size, how many at once)
    for (limit, size, want) in [
        (Limit::Count(2), 10, 2),
        (Limit::Count(2), 1, 2),
        (Limit::Percent(25.0), 3, 1),
        (Limit::Percent(25.0), 8, 2),
        (Limit::Percent(25.0), 11, 2),
        (Limit::Percent(25.0), 0, 1),
        (Limit::Percent(50.0), 3, 1),
        (Limit::Percent(100.0), 5, 5),
        (Limit::Percent(12.5), 16, 2),
    ] {
        assert_eq!(limit.of(size), want, "{limit} of {size}");
    }
}

#[test]
fn safety_control_problems_name_their_key() {
    let mut p = Policy::builtin().unwrap();
    p.guards.max_concurrent_actions = 0;
    p.guards.approval.expires_after = Duration::ZERO;
    p.guards.demotion.window = 0;
    p.guards.demotion.min_success_ratio = 1.5;
    p.guards.blast_radius.agents = Limit::Count(0);
    p.guards.blast_radius.per_server = Limit::Percent(150.0);
    p.guards.blast_radius.per_peer = Limit::Percent(0.0);
    let text = "classes = [\"failover\"]\ncron = \"0 25 * * *\"\nduration = \"1h\"";
    p.maintenance.push(toml::from_str(text).unwrap());
    let problems = p.problems();
    let want = [
        "guards.max_concurrent_actions must be at least 1",
        "guards.approval.expires_after must be greater than zero",
        "guards.demotion.window = 0 must be from 1 to 100",
        "guards.demotion.min_success_ratio = 1.5 must be in (0, 1]",
        "guards.blast_radius.agents: 0 would hold every disruptive step",
        "guards.blast_radius.per_server: 150% must be above 0% and at most 100%",
        "guards.blast_radius.per_peer: 0% must be above 0%",
        "maintenance[0].cron: \"0 25 * * *\": hour field \"25\": 25 is outside 0-23",
    ];
    assert_eq!(problems.len(), want.len(), "{problems:?}");
    for w in want {
        assert!(
            problems.iter().any(|p| p.starts_with(w)),
            "{w}: {problems:?}"
        );
    }
    p.guards.demotion.window = crate::knowledge::VERDICT_WINDOW + 1;
    assert!(
        p.problems()
            .iter()
            .any(|p| p.starts_with("guards.demotion.window = 101"))
    );
}

#[test]
fn maintenance_until_names_the_latest_window_holding_a_step() {
    let text = format!(
        "{DEFAULT_POLICY}\n\
         [[maintenance]]\nclasses = [\"agent_local\"]\n\
         start = \"2024-01-01T00:00:00Z\"\nend = \"2024-01-01T02:00:00Z\"\n\
         [[maintenance]]\nactuators = [\"restart-agent\"]\ncron = \"0 0 * * *\"\nduration = \"3h\"\n"
    );
    let p = Policy::from_toml(&text, "p.toml").unwrap();
    assert!(p.problems().is_empty(), "{:?}", p.problems());
    let at = |h: u64| std::time::UNIX_EPOCH + Duration::from_secs(1_704_067_200 + h * 3600);
    assert_eq!(p.open_maintenance(at(1)).len(), 2);
    assert_eq!(
        p.maintenance_until(at(1), Class::AgentLocal, "restart-agent"),
        Some(at(3))
    );
    assert_eq!(
        p.maintenance_until(at(1), Class::AgentLocal, "evict-agent"),
        Some(at(2))
    );
    assert_eq!(p.maintenance_until(at(1), Class::Gentle, "refetch"), None);
    assert_eq!(
        p.maintenance_until(at(2), Class::AgentLocal, "evict-agent"),
        None
    );
    assert_eq!(
        p.maintenance_until(at(2), Class::AgentLocal, "restart-agent"),
        Some(at(3))
    );
}
