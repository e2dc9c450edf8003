//! `report --format html`: the postmortem as one self-contained page: the verdict (and the
//! leak test's analysis), the leak suspects, the totals, resident memory reconciled, the
//! timeline, the flame graphs of host and device memory, the phases, the top live stacks and
//! the failures. Pictures are embedded as images (no script runs); every string from the
//! recording is escaped for HTML.

use std::fmt::Write as _;

use base64::Engine as _;

use super::{
    analysis::{cells_by_live_bytes, failures_by_count, waterfall},
    phases::phase_rows,
    suspects::{is_static, suspects},
    verdict::classify,
};
use crate::{
    escape::for_xml,
    recording::Recorded,
    views::{check, filter::Layer, flamegraph, human_bytes, human_delta, target_pids, timeline},
};

/// Rows of the stack tables.
const TOP: usize = 20;
/// Frames shown per stack.
const FRAMES: usize = 8;

const STYLE: &str = "body{font-family:Verdana,sans-serif;font-size:14px;margin:24px auto;\
max-width:1240px;color:#222}h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:\
1px solid #ccc}table{border-collapse:collapse}th,td{padding:3px 10px;border-bottom:1px solid \
#eee;text-align:right;vertical-align:top}th{background:#f4f4f4}td.frames{text-align:left;\
font-family:monospace;font-size:12px}ul.verdict li{margin:4px 0}.alarm{color:#b00}\
img{max-width:100%;border:1px solid #ddd}";

/// The page.
pub fn render(rec: &Recorded) -> String {
    let mut out = String::new();
    let command = for_xml(&rec.target.command);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>alloctrace postmortem: {command}</title><style>{STYLE}</style></head><body>\n"
    );
    let _ = writeln!(out, "<h1>Memory postmortem of <code>{command}</code></h1>");
    let _ = writeln!(
        out,
        "<p id=\"recording\">{}, {:.1} s{}{}</p>",
        for_xml(&target_pids(rec)),
        rec.duration_s,
        if rec.complete {
            ""
        } else {
            ", incomplete (the recorder died)"
        },
        rec.stop_reason
            .as_ref()
            .map(|r| format!(", ended: {}", for_xml(r)))
            .unwrap_or_default()
    );
    verdict(&mut out, rec);
    leak_test(&mut out, rec);
    leak_suspects(&mut out, rec);
    totals(&mut out, rec);
    resident(&mut out, rec);
    pictures(&mut out, rec);
    phases(&mut out, rec);
    stacks(&mut out, rec);
    failures(&mut out, rec);
    out.push_str("</body></html>\n");
    out
}

fn verdict(out: &mut String, rec: &Recorded) {
    out.push_str("<section id=\"verdict\"><h2>Verdict</h2><ul class=\"verdict\">\n");
    for f in classify(rec) {
        let name = serde_json::to_value(f.category)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let alarm = matches!(name.as_str(), "ends-in-oom" | "leaks");
        for line in &f.evidence {
            let _ = writeln!(
                out,
                "<li{}><b>{}</b>: {}</li>",
                if alarm { " class=\"alarm\"" } else { "" },
                name.replace('-', " "),
                for_xml(line)
            );
        }
    }
    out.push_str("</ul></section>\n");
}

fn leak_test(out: &mut String, rec: &Recorded) {
    let Some(a) = rec.check.and_then(|t| check::analyse(&rec.marks, t)) else {
        return;
    };
    out.push_str("<section id=\"check\"><h2>Memory Growth Analysis</h2><table>\n");
    let row = |k: &str, v: String| format!("<tr><th>{k}</th><td>{v}</td></tr>\n");
    let batches: Vec<String> = a.batches.iter().map(|&b| human_bytes(b)).collect();
    out.push_str(&row("batches", batches.join(", ")));
    out.push_str(&row(
        "initial avg",
        human_bytes(a.initial_avg.round() as u64),
    ));
    out.push_str(&row("final avg", human_bytes(a.final_avg.round() as u64)));
    out.push_str(&row(
        "growth",
        format!(
            "{} ({:+.1} %)",
            human_delta(a.growth_bytes.round() as i128),
            a.growth_percent
        ),
    ));
    out.push_str(&row("noise", format!("{:.1} %", a.noise_percent)));
    out.push_str(&row("verdict", format!("{:?}", a.verdict)));
    out.push_str("</table></section>\n");
}

fn leak_suspects(out: &mut String, rec: &Recorded) {
    out.push_str("<section id=\"suspects\"><h2>Leak suspects</h2>\n");
    let Some(s) = suspects(rec) else {
        out.push_str(
            "<p>Not judged: under 4 s of the recording after its warm-up.</p></section>\n",
        );
        return;
    };
    if s.rows.is_empty() {
        out.push_str("<p>None: no stack's live memory rose in every batch.</p></section>\n");
        return;
    }
    out.push_str(
        "<table><tr><th>#</th><th>growth</th><th>rate</th><th>class</th><th>phase</th>\
         <th>stack</th></tr>\n",
    );
    for (i, r) in s.rows.iter().take(TOP).enumerate() {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}/s</td><td>{}</td><td>{}</td><td class=\"frames\">{}</td></tr>",
            i + 1,
            human_delta(i128::from(r.growth)),
            human_bytes(r.bytes_per_s.round() as u64),
            r.key.class.name(),
            for_xml(&r.key.phase),
            frames(&rec.frames(r.key.stack))
        );
    }
    out.push_str("</table></section>\n");
}

fn totals(out: &mut String, rec: &Recorded) {
    out.push_str(
        "<section id=\"totals\"><h2>Totals</h2><table><tr><th>class</th><th>live</th>\
         <th>live blocks</th><th>peak</th><th>allocated</th></tr>\n",
    );
    for (class, t) in &rec.state.totals {
        if t.allocated_count == 0 && t.live_bytes == 0 && t.peak_bytes == 0 {
            continue;
        }
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            class.name(),
            human_bytes(t.live_bytes),
            t.live_count,
            human_bytes(t.peak_bytes),
            human_bytes(t.allocated_bytes)
        );
    }
    out.push_str("</table></section>\n");
}

fn resident(out: &mut String, rec: &Recorded) {
    let Some(w) = waterfall(rec) else {
        return;
    };
    out.push_str("<section id=\"resident\"><h2>Resident memory</h2><table>\n");
    let untraced = human_delta(i128::from(w.untraced_anon));
    let rows = [
        ("RSS", human_bytes(w.rss)),
        ("= file-backed", human_bytes(w.file)),
        ("+ shared memory", human_bytes(w.shmem)),
        ("+ anonymous", human_bytes(w.anon)),
        ("&nbsp;&nbsp;heap (live)", human_bytes(w.heap_live)),
        (
            "&nbsp;&nbsp;allocator-retained",
            human_bytes(w.allocator_retained),
        ),
        (
            "&nbsp;&nbsp;traced mappings",
            human_bytes(w.traced_mappings),
        ),
        ("&nbsp;&nbsp;untraced remainder", untraced),
    ];
    let pre_attach =
        (w.pre_attach.map(human_bytes)).map(|v| ("&nbsp;&nbsp;&nbsp;&nbsp;of which pre-attach", v));
    for (k, v) in rows.into_iter().chain(pre_attach) {
        let _ = writeln!(out, "<tr><th>{k}</th><td>{v}</td></tr>");
    }
    out.push_str("</table></section>\n");
}

/// The timeline and the flame graphs (host, then device when there is any), as images.
fn pictures(out: &mut String, rec: &Recorded) {
    out.push_str("<section id=\"timeline\"><h2>Over time</h2>\n");
    image(out, "timeline", timeline::render(rec).as_bytes());
    out.push_str("</section>\n<section id=\"flamegraphs\"><h2>Live memory by stack</h2>\n");
    for (layer, name) in [(Layer::Host, "host"), (Layer::Device, "device")] {
        let classes = layer.classes();
        let mut view = rec.clone();
        view.state
            .cells
            .retain(|k, c| classes.contains(&k.class) && c.live_bytes > 0);
        if view.state.cells.is_empty() {
            continue;
        }
        // Static memory has its own line in the text report: the pictures show what can grow.
        view.state.cells.retain(|k, _| !is_static(k.class));
        let options = flamegraph::FlamegraphOptions {
            note: Some(format!("{name} memory")),
            ..flamegraph::FlamegraphOptions::default()
        };
        if let Ok(svg) = flamegraph::render_svg(&view, &options) {
            image(out, &format!("flamegraph-{name}"), &svg);
        }
    }
    out.push_str("</section>\n");
}

/// An SVG as an image (its scripts do not run there).
fn image(out: &mut String, id: &str, svg: &[u8]) {
    let data = base64::engine::general_purpose::STANDARD.encode(svg);
    let _ = writeln!(
        out,
        "<p><img id=\"{id}\" alt=\"{id}\" src=\"data:image/svg+xml;base64,{data}\"></p>"
    );
}

fn phases(out: &mut String, rec: &Recorded) {
    let Some(rows) = phase_rows(rec) else {
        return;
    };
    out.push_str(
        "<section id=\"phases\"><h2>Phases</h2><table><tr><th>phase</th><th>entries</th>\
         <th>live</th><th>live per entry</th><th>allocated</th><th>freed</th></tr>\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            for_xml(&r.phase),
            r.entries.map_or("-".into(), |n| n.to_string()),
            human_bytes(r.live_bytes),
            r.live_per_entry
                .map_or("-".into(), |b| human_bytes(b.round() as u64)),
            human_bytes(r.allocated_bytes),
            human_bytes(r.freed_bytes)
        );
    }
    out.push_str("</table></section>\n");
}

fn stacks(out: &mut String, rec: &Recorded) {
    out.push_str(
        "<section id=\"stacks\"><h2>Top live stacks</h2><table><tr><th>live</th>\
         <th>blocks</th><th>class</th><th>phase</th><th>stack</th></tr>\n",
    );
    let rows = cells_by_live_bytes(rec);
    for (key, c) in rows.iter().filter(|(k, _)| !is_static(k.class)).take(TOP) {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"frames\">{}</td></tr>",
            human_bytes(c.live_bytes),
            c.live_count,
            key.class.name(),
            for_xml(&key.phase),
            frames(&rec.frames(key.stack))
        );
    }
    out.push_str("</table></section>\n");
}

fn failures(out: &mut String, rec: &Recorded) {
    let failures = failures_by_count(rec);
    if failures.is_empty() {
        return;
    }
    out.push_str(
        "<section id=\"failures\"><h2>Failed allocations</h2><table><tr><th>calls</th>\
         <th>function</th><th>size</th><th>error</th><th>stack</th></tr>\n",
    );
    for (key, n) in failures.iter().take(TOP) {
        let _ = writeln!(
            out,
            "<tr><td>{n}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"frames\">{}</td></tr>",
            for_xml(&key.function),
            key.size,
            for_xml(&key.error),
            frames(&rec.frames(key.stack))
        );
    }
    out.push_str("</table></section>\n");
}

/// The first frames of a stack, escaped, innermost first.
fn frames(frames: &[String]) -> String {
    let mut parts: Vec<String> = (frames.iter().take(FRAMES))
        .map(|f| for_xml(f).into_owned())
        .collect();
    if frames.len() > FRAMES {
        parts.push(format!("… ({} more)", frames.len() - FRAMES));
    }
    parts.join(" ← ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::fixture::{self, HOSTILE};

    #[test]
    fn the_page_has_every_section_and_escapes_what_the_recording_says() {
        let page = render(&fixture::recorded());
        for id in [
            "verdict",
            "suspects",
            "totals",
            "timeline",
            "flamegraphs",
            "stacks",
        ] {
            assert!(page.contains(&format!("<section id=\"{id}\">")), "{id}");
        }
        assert!(page.contains("<img id=\"timeline\""));
        assert!(page.contains("<img id=\"flamegraph-host\""));
        assert!(page.contains("leak_malloc"));
        assert!(!page.contains("<script"), "no script runs in the page");
        let hostile = render(&fixture::hostile());
        assert!(!hostile.contains(HOSTILE));
        assert!(!hostile.contains('\u{1b}'));
    }
}
