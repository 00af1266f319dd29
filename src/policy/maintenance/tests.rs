use super::*;

/// 2024-01-01T00:00:00Z, a Monday.
const JAN_1_2024: u64 = 1_704_067_200;

/// 2024-01-`day`T`hh`:`mm`:`ss`Z.
fn jan(day: u64, hh: u64, mm: u64, ss: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(JAN_1_2024 + (day - 1) * DAY + hh * 3600 + mm * 60 + ss)
}

fn window(toml_text: &str) -> MaintenanceWindow {
    toml::from_str(toml_text).unwrap()
}

fn recurring(cron: &str, duration: &str) -> MaintenanceWindow {
    window(&format!(
        "classes = [\"agent_local\"]\ncron = \"{cron}\"\nduration = \"{duration}\""
    ))
}

#[test]
fn civil_dates() {
    assert_eq!(civil_from_days(0), (1970, 1, 1));
    assert_eq!(civil_from_days((JAN_1_2024 / DAY) as i64), (2024, 1, 1));
    assert_eq!(
        civil_from_days((JAN_1_2024 / DAY) as i64 + 59),
        (2024, 2, 29)
    );
    assert_eq!(
        civil_from_days((JAN_1_2024 / DAY) as i64 - 1),
        (2023, 12, 31)
    );
}

#[test]
fn rfc3339_instants() {
    let midnight = Ok(jan(1, 0, 0, 0));
    for text in [
        "2024-01-01T00:00:00Z",
        "2024-01-01t00:00:00z",
        "2024-01-01T05:30:00+05:30",
        "2023-12-31T19:00:00-05:00",
        " 2024-01-01T00:00:00+00:00 ",
    ] {
        assert_eq!(parse_rfc3339(text), midnight, "{text}");
    }
    assert_eq!(
        parse_rfc3339("2024-01-01T00:00:00.5Z"),
        Ok(jan(1, 0, 0, 0) + Duration::from_millis(500))
    );
    for text in [
        "2024-01-01T00:00:00",
        "2024-01-01T00:00:00+0100",
        "2024-01-01T00:00:00+24:00",
        "2024-13-01T00:00:00Z",
        "yesterday",
        "",
    ] {
        assert!(parse_rfc3339(text).is_err(), "{text}");
    }
}

#[test]
fn fields_parse_to_their_values() {
    let values = |bits: u64| (0..64).filter(|b| bits & (1 << b) != 0).collect::<Vec<_>>();
    let s = Schedule::parse("*/15 1-5/2 5/10 jan,JUL-sep mon-fri").unwrap();
    assert_eq!(values(s.minutes), [0, 15, 30, 45]);
    assert_eq!(values(u64::from(s.hours)), [1, 3, 5]);
    assert_eq!(values(u64::from(s.days_of_month)), [5, 15, 25]);
    assert_eq!(values(u64::from(s.months)), [1, 7, 8, 9]);
    assert_eq!(values(u64::from(s.days_of_week)), [1, 2, 3, 4, 5]);
    assert!(!s.dom_star && !s.dow_star);
    // Sunday is 0 and 7; a range may end on 7.
    let s = Schedule::parse("0 0 * * 7").unwrap();
    assert_eq!(values(u64::from(s.days_of_week)), [0]);
    let s = Schedule::parse("0 0 * * fri-7").unwrap();
    assert_eq!(values(u64::from(s.days_of_week)), [0, 5, 6]);
    assert_eq!(Schedule::parse("@weekly"), Schedule::parse("0 0 * * sun"));
}

#[test]
fn bad_expressions_say_what_is_wrong() {
    for (text, want) in [
        ("0 2 * *", "has 4 fields"),
        ("0 2 * * * *", "has 6 fields"),
        ("60 * * * *", "minute field \"60\": 60 is outside 0-59"),
        ("* 24 * * *", "hour field"),
        ("* * 0 * *", "day of month field \"0\": 0 is outside 1-31"),
        ("* * * 13 *", "month field"),
        ("* * * * 8", "day of week field"),
        ("* * * foo *", "is not a number or a name"),
        ("*/0 * * * *", "a step must be at least 1"),
        ("*/x * * * *", "step \"x\" is not a number"),
        ("5-1 * * * *", "runs backwards"),
        ("1,,2 * * * *", "empty value"),
        ("@reboot", "unknown macro"),
    ] {
        let err = Schedule::parse(text).unwrap_err();
        assert!(err.contains(want), "{text}: {err}");
    }
}

#[test]
fn weekly_window_edges() {
    // Sundays 02:00 for 2 h; 2024-01-07 and 2024-01-14 are Sundays.
    let w = recurring("0 2 * * 0", "2h");
    let until = Some(jan(7, 4, 0, 0));
    for (at, want) in [
        (jan(7, 1, 59, 59), None),
        (jan(7, 2, 0, 0), until),
        (jan(7, 3, 59, 59), until),
        (jan(7, 3, 59, 59) + Duration::from_millis(999), until),
        (jan(7, 4, 0, 0), None),
        (jan(8, 2, 30, 0), None),
        (jan(13, 2, 30, 0), None),
        (jan(14, 2, 30, 0), Some(jan(14, 4, 0, 0))),
    ] {
        assert_eq!(w.open_until(at), want, "{at:?}");
    }
}

#[test]
fn a_window_spans_midnight_and_the_new_year() {
    // Daily 23:30 for 1 h.
    let w = recurring("30 23 * * *", "1h");
    for (at, want) in [
        (jan(7, 23, 29, 59), None),
        (jan(7, 23, 45, 0), Some(jan(8, 0, 30, 0))),
        (jan(8, 0, 29, 59), Some(jan(8, 0, 30, 0))),
        (jan(8, 0, 30, 0), None),
    ] {
        assert_eq!(w.open_until(at), want, "{at:?}");
    }
    // New Year's Eve 23:30 for 2 h: still open in 2024.
    let w = recurring("30 23 31 dec *", "2h");
    assert_eq!(w.open_until(jan(1, 1, 0, 0)), Some(jan(1, 1, 30, 0)));
    assert_eq!(w.open_until(jan(1, 1, 30, 0)), None);
    assert_eq!(w.open_until(jan(31, 23, 45, 0)), None);
}

#[test]
fn overlapping_occurrences_stay_open_until_the_latest_ends() {
    // Every hour for 90 minutes: always open, until 90 min after the last.
    let w = recurring("0 * * * *", "90m");
    assert_eq!(w.open_until(jan(3, 10, 20, 0)), Some(jan(3, 11, 30, 0)));
}

#[test]
fn both_day_fields_restricted_means_either() {
    // The 1st of the month or any Monday, at midnight (within a minute).
    let s = Schedule::parse("0 0 1 * mon").unwrap();
    let fires = |at: SystemTime| s.last_fire(at, Duration::from_secs(60)).is_some();
    assert!(fires(jan(1, 0, 0, 30))); // Monday the 1st
    assert!(fires(jan(8, 0, 0, 30))); // Monday
    assert!(!fires(jan(9, 0, 0, 30))); // Tuesday
    assert!(fires(jan(32, 0, 0, 30))); // Thursday 1 February
    assert!(!fires(jan(33, 0, 0, 30)));
    // One restricted, the other `*` (or `*/n`): both must match.
    let s = Schedule::parse("0 0 1 * *").unwrap();
    assert!(!s.fires_on((JAN_1_2024 / DAY) as i64 + 7));
    let s = Schedule::parse("0 0 * * */2").unwrap(); // Sun, Tue, Thu, Sat
    assert!(!s.fires_on((JAN_1_2024 / DAY) as i64)); // Monday
    assert!(s.fires_on((JAN_1_2024 / DAY) as i64 + 1)); // Tuesday
}

#[test]
fn looks_back_only_as_far_as_the_duration() {
    let leap = Schedule::parse("0 0 29 2 *").unwrap();
    let month = Duration::from_secs(31 * DAY);
    // 1 March 2024: 29 February was a day ago.
    assert_eq!(
        leap.last_fire(jan(61, 12, 0, 0), month),
        Some(jan(60, 0, 0, 0))
    );
    // 2025 has no 29 February.
    let mar_1_2025 = jan(61, 12, 0, 0) + Duration::from_secs(365 * DAY);
    assert_eq!(leap.last_fire(mar_1_2025, month), None);
    // Before 1970 nothing fires.
    assert_eq!(
        leap.last_fire(UNIX_EPOCH - Duration::from_secs(1), month),
        None
    );
}

#[test]
fn explicit_window() {
    let w = window(
        "actuators = [\"restart-agent\"]\nstart = \"2024-01-07T03:00:00+01:00\"\nend = \"2024-01-07T04:00:00Z\"",
    );
    assert!(w.problems().is_empty(), "{:?}", w.problems());
    for (at, want) in [
        (jan(7, 1, 59, 59), None),
        (jan(7, 2, 0, 0), Some(jan(7, 4, 0, 0))),
        (jan(7, 3, 59, 59), Some(jan(7, 4, 0, 0))),
        (jan(7, 4, 0, 0), None),
    ] {
        assert_eq!(w.open_until(at), want, "{at:?}");
    }
    assert!(w.holds(Class::Gentle, "restart-agent"));
    assert!(!w.holds(Class::AgentLocal, "evict-agent"));
    let by_class = recurring("0 2 * * 0", "2h");
    assert!(by_class.holds(Class::AgentLocal, "evict-agent"));
    assert!(!by_class.holds(Class::Failover, "failover"));
}

#[test]
fn problems_name_the_field() {
    let fields = |text: &str| {
        let mut v: Vec<String> = window(text)
            .problems()
            .into_iter()
            .map(|(f, why)| format!("{f}: {why}"))
            .collect();
        v.sort();
        v
    };
    let ok = "classes = [\"failover\"]\n";
    assert_eq!(
        fields(&format!("{ok}cron = \"0 2 * * 0\"\nduration = \"2h\"")),
        Vec::<String>::new()
    );
    let cases = [
        (
            "cron = \"0 2 * * 0\"\nduration = \"2h\"",
            "classes: the window holds nothing",
        ),
        (
            "classes = [\"gentle\"]",
            "cron: set either cron and duration, or start and end",
        ),
        (
            "classes = [\"gentle\"]\ncron = \"0 2 * * 0\"\nduration = \"2h\"\nstart = \"2024-01-01T00:00:00Z\"",
            "not both",
        ),
        (
            "classes = [\"gentle\"]\ncron = \"0 2 * * 0\"",
            "duration: needed with cron",
        ),
        (
            "classes = [\"gentle\"]\nduration = \"2h\"",
            "cron: needed with duration",
        ),
        (
            "classes = [\"gentle\"]\ncron = \"0 2 * * 0\"\nduration = \"0s\"",
            "duration: must be greater than zero",
        ),
        (
            "classes = [\"gentle\"]\ncron = \"0 2 * * 0\"\nduration = \"32days\"",
            "use start and end",
        ),
        (
            "classes = [\"gentle\"]\ncron = \"0 2 * *\"\nduration = \"2h\"",
            "cron: \"0 2 * *\": has 4 fields",
        ),
        (
            "classes = [\"gentle\"]\nstart = \"2024-01-01T00:00:00Z\"",
            "end: needed (both start and end)",
        ),
        (
            "classes = [\"gentle\"]\nstart = \"2024-01-01T00:00:00Z\"\nend = \"2024-01-01T00:00:00Z\"",
            "end: must be after start",
        ),
        (
            "classes = [\"gentle\"]\nstart = \"2024-01-01\"\nend = \"2024-01-02T00:00:00Z\"",
            "start: \"2024-01-01\"",
        ),
    ];
    for (text, want) in cases {
        let got = fields(text);
        assert!(got.iter().any(|p| p.contains(want)), "{text}: {got:?}");
    }
    // An unknown class is a parse error.
    assert!(toml::from_str::<MaintenanceWindow>("classes = [\"gentle_ish\"]").is_err());
}
