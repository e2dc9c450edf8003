//! `report --format pprof`: the live (and allocated) memory by stack as a pprof profile
//! (gzipped protobuf, `profile.proto` of github.com/google/pprof), which `go tool pprof`,
//! Pyroscope and Grafana open. Sample types as Go's heap profiles: `inuse_objects`,
//! `inuse_space`, `alloc_objects`, `alloc_space`. A sample is a cell: its frames innermost
//! first, then a root frame naming its class (`[heap]`), with labels `class`, `phase` and `pid`.
//! Frames are names (the recording keeps no addresses): one function and one location a name.

use std::{collections::HashMap, io::Write as _};

use flate2::{Compression, write::GzEncoder};
use prost::Message;

use crate::recording::Recorded;

/// `profile.proto`'s messages, as far as this export uses them (field numbers as there).
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
    }
}

/// The string table: index 0 is "" as the format requires.
#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn id(&mut self, s: &str) -> i64 {
        if self.table.is_empty() {
            self.table.push(String::new());
            self.index.insert(String::new(), 0);
        }
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }
}

/// The profile, before compression.
fn profile(rec: &Recorded) -> proto::Profile {
    let mut strings = Strings::default();
    let sample_type = [
        ("inuse_objects", "count"),
        ("inuse_space", "bytes"),
        ("alloc_objects", "count"),
        ("alloc_space", "bytes"),
    ]
    .map(|(t, u)| proto::ValueType {
        r#type: strings.id(t),
        unit: strings.id(u),
    })
    .to_vec();
    // One function and one location per frame name, ids from 1.
    let mut location_of: HashMap<String, u64> = HashMap::new();
    let (mut locations, mut functions) = (Vec::new(), Vec::new());
    let mut location = |name: &str, strings: &mut Strings| -> u64 {
        if let Some(&id) = location_of.get(name) {
            return id;
        }
        let id = location_of.len() as u64 + 1;
        let name_id = strings.id(name);
        functions.push(proto::Function {
            id,
            name: name_id,
            system_name: name_id,
        });
        locations.push(proto::Location {
            id,
            line: vec![proto::Line { function_id: id }],
        });
        location_of.insert(name.to_string(), id);
        id
    };
    let mut samples = Vec::new();
    for (key, c) in &rec.state.cells {
        if c.live_bytes == 0 && c.allocated_bytes == 0 {
            continue;
        }
        let mut location_id: Vec<u64> = (rec.frames(key.stack).iter())
            .map(|f| location(f, &mut strings))
            .collect();
        location_id.push(location(&format!("[{}]", key.class.name()), &mut strings));
        let value = [
            c.live_count,
            c.live_bytes,
            c.allocated_count,
            c.allocated_bytes,
        ]
        .map(|v| i64::try_from(v).unwrap_or(i64::MAX))
        .to_vec();
        let label = vec![
            proto::Label {
                key: strings.id("class"),
                str: strings.id(key.class.name()),
                num: 0,
            },
            proto::Label {
                key: strings.id("phase"),
                str: strings.id(&key.phase),
                num: 0,
            },
            proto::Label {
                key: strings.id("pid"),
                str: 0,
                num: i64::from(key.pid),
            },
        ];
        samples.push(proto::Sample {
            location_id,
            value,
            label,
        });
    }
    let comment = vec![strings.id(&format!(
        "alloctrace {}: {}",
        rec.tool_version, rec.target.command
    ))];
    let default_sample_type = strings.id("inuse_space");
    proto::Profile {
        sample_type,
        sample: samples,
        location: locations,
        function: functions,
        string_table: strings.table,
        time_nanos: i64::try_from(rec.started_unix_ns).unwrap_or(0),
        duration_nanos: (rec.duration_s * 1e9) as i64,
        comment,
        default_sample_type,
    }
}

/// The profile, gzipped, as pprof reads it.
pub fn render(rec: &Recorded) -> std::io::Result<Vec<u8>> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&profile(rec).encode_to_vec())?;
    gz.finish()
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::views::fixture;

    /// Decodes what `render` wrote.
    fn decode(bytes: &[u8]) -> proto::Profile {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut raw)
            .unwrap();
        proto::Profile::decode(raw.as_slice()).unwrap()
    }

    #[test]
    fn every_cell_is_a_sample_with_its_figures_frames_and_labels() {
        let rec = fixture::recorded();
        let p = decode(&render(&rec).unwrap());
        assert_eq!(p.string_table[0], "");
        let s = |i: i64| p.string_table[i as usize].as_str();
        let types: Vec<&str> = p.sample_type.iter().map(|t| s(t.r#type)).collect();
        assert_eq!(
            types,
            [
                "inuse_objects",
                "inuse_space",
                "alloc_objects",
                "alloc_space"
            ]
        );
        assert_eq!(s(p.default_sample_type), "inuse_space");
        // The samples' live bytes add up to the cells'.
        let live: i64 = p.sample.iter().map(|x| x.value[1]).sum();
        let cells: u64 = rec.state.cells.values().map(|c| c.live_bytes).sum();
        assert_eq!(live as u64, cells);
        // Each sample: its frames innermost first, its class as the root.
        let name = |loc: u64| {
            let f = &p.function[p.location[loc as usize - 1].line[0].function_id as usize - 1];
            s(f.name)
        };
        let leak = (p.sample.iter())
            .find(|x| name(x.location_id[0]) == "leak_malloc")
            .expect("the leak's sample");
        let frames: Vec<&str> = leak.location_id.iter().map(|&l| name(l)).collect();
        assert_eq!(frames, ["leak_malloc", "run_scenario", "main", "[heap]"]);
        let labels: Vec<(&str, &str, i64)> = (leak.label.iter())
            .map(|l| (s(l.key), s(l.str), l.num))
            .collect();
        assert_eq!(
            labels,
            [("class", "heap", 0), ("phase", "none", 0), ("pid", "", 7)]
        );
    }

    /// The decoded profile as text: its header, then one line a sample (values; frames,
    /// innermost first; labels) — what `go tool pprof -raw` shows, kept as a golden.
    fn as_text(p: &proto::Profile) -> String {
        let s = |i: i64| p.string_table[i as usize].as_str();
        let mut out = String::new();
        let types: Vec<String> = (p.sample_type.iter())
            .map(|t| format!("{}/{}", s(t.r#type), s(t.unit)))
            .collect();
        out += &format!(
            "sample types: {} (default {})\ntime {} ns, duration {} ns\n",
            types.join(" "),
            s(p.default_sample_type),
            p.time_nanos,
            p.duration_nanos
        );
        for c in &p.comment {
            out += &format!("comment: {}\n", s(*c));
        }
        for x in &p.sample {
            let frames: Vec<String> = (x.location_id.iter())
                .map(|&l| {
                    let loc = &p.location[l as usize - 1];
                    let f = &p.function[loc.line[0].function_id as usize - 1];
                    s(f.name).to_string()
                })
                .collect();
            let labels: Vec<String> = (x.label.iter())
                .map(|l| match l.str {
                    0 => format!("{}={}", s(l.key), l.num),
                    str => format!("{}={}", s(l.key), s(str)),
                })
                .collect();
            out += &format!(
                "{:?} {} | {}\n",
                x.value,
                frames.join(" <- "),
                labels.join(" ")
            );
        }
        out
    }

    #[test]
    fn profile_matches_golden() {
        let p = decode(&render(&fixture::recorded()).unwrap());
        fixture::assert_golden("pprof.txt", &as_text(&p));
    }
}
