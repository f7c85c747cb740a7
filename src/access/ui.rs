//! `/admin/ui`: the operator page. Server-rendered HTML with no script and
//! no external asset (one inline style, allowed by a per-response nonce in a
//! strict CSP), so it renders anywhere and leaks nothing. Findings first,
//! then feed health with the control-window distribution per feed drawn as
//! inline SVG, then the picture.

use std::fmt::Write as _;

use super::report::{AccessReport, FeedHealth};

/// The page's Content-Security-Policy for a style nonce.
pub fn csp(nonce: &str) -> String {
    format!(
        "default-src 'none'; style-src 'nonce-{nonce}'; img-src 'none'; script-src 'none'; \
         base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
}

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            _ => o.push(c),
        }
    }
    o
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#1d232a;background:#f7f8fa}
h1{font-size:1.4rem;margin:0 0 .3rem}h2{font-size:1.1rem;margin:1.6rem 0 .5rem}
.meta{color:#5b6673}
.cards{display:flex;gap:.8rem;flex-wrap:wrap;margin:.8rem 0}
.card{background:#fff;border:1px solid #dde2e8;border-radius:6px;padding:.5rem .9rem;min-width:7rem}
.card b{display:block;font-size:1.5rem}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde2e8}
th,td{padding:.35rem .5rem;border-bottom:1px solid #eef1f4;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}
.sev{display:inline-block;padding:0 .45rem;border-radius:3px;color:#fff;font-weight:600}
.critical{background:#b42318}.high{background:#d9480f}.medium{background:#b7791f}.low{background:#5b6673}
.ok{color:#1e7b34}.bad{color:#b42318;font-weight:600}
code{font-size:12px;background:#eef1f4;padding:0 .2rem;border-radius:3px}
.charts{display:flex;gap:1rem;flex-wrap:wrap}
.chart{background:#fff;border:1px solid #dde2e8;border-radius:6px;padding:.5rem}
form{margin:.5rem 0}input{width:9rem}
";

fn fmt_le(le: f64) -> String {
    if le >= f64::MAX {
        "+Inf".into()
    } else if le < 1.0 {
        format!("{} ms", (le * 1000.0).round())
    } else {
        format!("{le} s")
    }
}

/// One feed's control-window distribution as an SVG bar chart: one bar per
/// histogram bucket (observations in that bucket, not cumulative).
pub fn chart(h: &FeedHealth) -> String {
    const W: f64 = 360.0;
    const H: f64 = 140.0;
    const PAD: f64 = 24.0;
    let mut prev = 0u64;
    let bars: Vec<(f64, u64)> = h
        .control_window
        .iter()
        .map(|b| {
            let n = b.count.saturating_sub(prev);
            prev = b.count;
            (b.le, n)
        })
        .collect();
    let max = bars.iter().map(|b| b.1).max().unwrap_or(0).max(1) as f64;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg class=\"window-chart\" data-feed=\"{f}\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"control window distribution for {f}\">\
<title>control window distribution: {f}</title>\
<line x1=\"{PAD}\" y1=\"{y0}\" x2=\"{W}\" y2=\"{y0}\" stroke=\"#8893a0\"/>",
        f = esc(&h.feed),
        y0 = H - PAD,
    );
    let n = bars.len().max(1) as f64;
    let bw = (W - PAD) / n;
    for (i, (le, count)) in bars.iter().enumerate() {
        let bh = (*count as f64 / max) * (H - 2.0 * PAD);
        let x = PAD + i as f64 * bw;
        let y = H - PAD - bh;
        let _ = write!(
            s,
            "<rect class=\"bar\" data-le=\"{le}\" data-count=\"{count}\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{bh:.1}\" fill=\"#2f6fdf\"><title>≤ {label}: {count}</title></rect>",
            le = if *le >= f64::MAX {
                "+Inf".to_owned()
            } else {
                le.to_string()
            },
            w = (bw - 2.0).max(1.0),
            label = esc(&fmt_le(*le)),
        );
        if i % 3 == 0 || i + 1 == bars.len() {
            let _ = write!(
                s,
                "<text x=\"{x:.1}\" y=\"{ty}\" font-size=\"9\" fill=\"#5b6673\">{}</text>",
                esc(&fmt_le(*le)),
                ty = H - 8.0,
            );
        }
    }
    let _ = write!(
        s,
        "<text x=\"2\" y=\"12\" font-size=\"10\" fill=\"#5b6673\">{}</text></svg>",
        max as u64
    );
    s
}

/// The whole page.
pub fn page(r: &AccessReport, nonce: &str) -> String {
    let mut s = String::with_capacity(16 * 1024);
    let count = |sev: &str| {
        r.findings
            .iter()
            .filter(|f| f.severity.as_str() == sev)
            .count()
    };
    let _ = write!(
        s,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
    <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
    <title>portcullis · access</title><style nonce=\"{nonce}\">{STYLE}</style></head><body>\
    <h1>Access picture</h1><div class=\"meta\">generated {gen} · snapshot version {v} · {rows} route rows, {toks} tokens remembered</div>\
    <div class=\"cards\">\
    <div class=\"card\"><b>{subj}</b>subjects</div>\
    <div class=\"card\"><b class=\"{cc}\">{c}</b>critical</div>\
    <div class=\"card\"><b>{h}</b>high</div>\
    <div class=\"card\"><b>{m}</b>medium</div>\
    <div class=\"card\"><b>{l}</b>low</div>\
    <div class=\"card\"><b class=\"{sc}\">{silent}</b>silent feeds</div></div>",
        nonce = esc(nonce),
        gen = esc(&r.generated_at),
        v = r.snapshot_version,
        rows = r.memory.route_rows,
        toks = r.memory.tokens,
        subj = r.subjects.len(),
        c = count("critical"),
        cc = if count("critical") > 0 { "bad" } else { "ok" },
        h = count("high"),
        m = count("medium"),
        l = count("low"),
        silent = r.feeds.iter().filter(|f| f.silent).count(),
        sc = if r.feeds.iter().any(|f| f.silent) { "bad" } else { "ok" },
    );
    let val = |o: &Option<String>| esc(o.as_deref().unwrap_or(""));
    let _ = write!(
        s,
        "<form method=\"get\" action=\"/admin/ui\">subject <input name=\"subject\" value=\"{}\"> device <input name=\"device\" value=\"{}\"> route <input name=\"route\" value=\"{}\"> finding <input name=\"finding\" value=\"{}\"> <button>filter</button></form>",
        val(&r.filter.subject),
        val(&r.filter.device),
        val(&r.filter.route),
        val(&r.filter.finding),
    );

    let _ = write!(
        s,
        "<h2>Findings ({})</h2><table id=\"findings\"><thead><tr><th>severity</th><th>finding</th><th>who / what</th><th>summary</th><th>evidence</th><th>fix</th></tr></thead><tbody>",
        r.findings.len()
    );
    if r.findings.is_empty() {
        s.push_str("<tr><td colspan=\"6\" class=\"ok\">no findings</td></tr>");
    }
    for f in &r.findings {
        let who = [
            f.subject
                .as_deref()
                .map(|x| format!("subject <code>{}</code>", esc(x))),
            f.device
                .as_deref()
                .map(|x| format!("device <code>{}</code>", esc(x))),
            f.feed
                .as_deref()
                .map(|x| format!("feed <code>{}</code>", esc(x))),
            (!f.routes.is_empty()).then(|| format!("routes {}", esc(&f.routes.join(", ")))),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("<br>");
        let mut ev = String::new();
        for e in &f.evidence.event_ids {
            let _ = write!(ev, "event <code>{}</code><br>", esc(e));
        }
        for q in &f.evidence.request_ids {
            let _ = write!(ev, "request <code>{}</code><br>", esc(q));
        }
        for c in &f.evidence.credentials {
            let _ = write!(ev, "{}<br>", esc(c));
        }
        for t in &f.evidence.times {
            let _ = write!(ev, "{}<br>", esc(t));
        }
        let _ = write!(
            s,
            "<tr class=\"finding\" data-kind=\"{k}\"><td><span class=\"sev {sev}\">{sev}</span></td><td>{k}</td><td>{who}</td><td>{sum}</td><td>{ev}</td><td>{fix}</td></tr>",
            k = f.kind.as_str(),
            sev = f.severity.as_str(),
            sum = esc(&f.summary),
            fix = esc(&f.fix),
        );
    }
    s.push_str("</tbody></table>");

    s.push_str("<h2>Feeds</h2><table id=\"feeds\"><thead><tr><th>feed</th><th>last event</th><th>events</th><th>expected every</th><th>state</th><th>control windows</th><th>mean window</th></tr></thead><tbody>");
    if r.feeds.is_empty() {
        s.push_str("<tr><td colspan=\"7\">no feed has delivered an event yet</td></tr>");
    }
    for h in &r.feeds {
        let mean = if h.control_window_count > 0 {
            format!(
                "{:.1} ms",
                h.control_window_sum_s * 1000.0 / h.control_window_count as f64
            )
        } else {
            "-".into()
        };
        let _ = write!(
            s,
            "<tr><td>{f}</td><td>{last}<br><code>{id}</code></td><td>{n}</td><td>{exp}</td><td class=\"{cls}\">{state}</td><td>{w}</td><td>{mean}</td></tr>",
            f = esc(&h.feed),
            last = esc(h.last_event_at.as_deref().unwrap_or("never")),
            id = esc(h.last_event_id.as_deref().unwrap_or("")),
            n = h.events,
            exp = h
                .expected_interval_s
                .map_or("-".into(), |s| format!("{s} s")),
            cls = if h.silent { "bad" } else { "ok" },
            state = if h.silent { "silent" } else { "ok" },
            w = h.control_window_count,
        );
    }
    s.push_str("</tbody></table><h2>Control window per feed</h2><p class=\"meta\">time from a feed event's acceptance to the first request decided on the new state; one bar per histogram bucket</p><div class=\"charts\">");
    let mut any = false;
    for h in r.feeds.iter().filter(|h| !h.control_window.is_empty()) {
        any = true;
        let _ = write!(
            s,
            "<div class=\"chart\"><b>{}</b> · {} windows<br>{}</div>",
            esc(&h.feed),
            h.control_window_count,
            chart(h)
        );
    }
    if !any {
        s.push_str("<p class=\"meta\">no control window measured yet</p>");
    }
    s.push_str("</div>");

    let _ = write!(
        s,
        "<h2>Picture ({})</h2><table id=\"picture\"><thead><tr><th>subject</th><th>kind</th><th>status</th><th>devices</th><th>groups / entitlements</th><th>sessions</th><th>tokens</th><th>last decision per route</th><th>findings</th></tr></thead><tbody>",
        r.subjects.len()
    );
    if r.subjects.is_empty() {
        s.push_str("<tr><td colspan=\"9\">nothing matches</td></tr>");
    }
    for v in &r.subjects {
        let devices = v
            .devices
            .iter()
            .map(|d| {
                let bad = d.lifecycle != "enrolled" && d.known
                    || d.compliance == "non_compliant"
                    || d.compromised;
                format!(
                    "<code>{}</code> <span class=\"{}\">{}/{}{}</span>",
                    esc(&d.id),
                    if bad { "bad" } else { "ok" },
                    esc(&d.lifecycle),
                    esc(&d.compliance),
                    if d.compromised { "/compromised" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join("<br>");
        let routes = v
            .routes
            .iter()
            .map(|r| {
                format!(
                    "{} {}: <b>{}</b> {}",
                    esc(&r.route),
                    r.device
                        .as_deref()
                        .map(|d| format!("({})", esc(d)))
                        .unwrap_or_default(),
                    esc(&r.decision),
                    esc(&crate::util::rfc3339(r.last_ms, false))
                )
            })
            .collect::<Vec<_>>()
            .join("<br>");
        let _ = write!(
            s,
            "<tr><td><code>{sub}</code></td><td>{kind}</td><td class=\"{scls}\">{status}</td><td>{devices}</td><td>{groups}<br><i>{ents}</i></td><td>{sess}</td><td>{toks}</td><td>{routes}</td><td class=\"{fcls}\">{finds}</td></tr>",
            sub = esc(&v.subject),
            kind = esc(&v.kind),
            status = esc(&v.status),
            scls = if v.status == "active" { "ok" } else { "bad" },
            groups = esc(&v.groups.join(", ")),
            ents = esc(&v.entitlements.join(", ")),
            sess = v.sessions.len(),
            toks = v.tokens.len(),
            finds = esc(&v.findings.join(", ")),
            fcls = if v.findings.is_empty() { "ok" } else { "bad" },
        );
    }
    s.push_str("</tbody></table></body></html>");
    s
}
