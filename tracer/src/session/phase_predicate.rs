//! Conditions on a phase rule's call (`--phase NAME=LIB:SYMBOL[CONDITION]`): a value at the
//! function's entry — an integer argument, or a word on the stack (an argument passed in
//! memory, such as a struct passed by value) — compared with a number. The call is in the
//! rule's phase only when the condition holds; the kernel checks it at the entry
//! (`tracer-ebpf/src/phase.rs`). llama.cpp's `llama_decode(ctx, llama_batch)` gets its batch on
//! the stack, token count first: `prefill=libllama.so:llama_decode[sp+8:i32>1]`.

use std::{fmt, str::FromStr};

use tracer_common::phase::{PhasePredicate, predicate};

/// Where the compared value is at the function's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// The integer argument of this number, from 1 (`arg1` .. `arg6`: rdi .. r9).
    Arg(u8),
    /// This many bytes above the stack pointer (`sp+8`: the first argument passed in memory;
    /// `sp+0` holds the return address).
    Stack(u32),
}

/// `PLACE[:TYPE] OP VALUE`, as given after the symbol in brackets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Predicate {
    pub place: Place,
    /// `i32`, `u32`, `i64` (the default) or `u64`.
    pub width: u8,
    pub signed: bool,
    pub op: Op,
    pub value: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

impl Op {
    /// The operators as written, the two-character ones first (so that `>=` is not `>`).
    const WRITTEN: [(&'static str, Op); 6] = [
        (">=", Op::Ge),
        ("<=", Op::Le),
        ("==", Op::Eq),
        ("!=", Op::Ne),
        (">", Op::Gt),
        ("<", Op::Lt),
    ];

    fn written(self) -> &'static str {
        (Op::WRITTEN.iter())
            .find(|(_, op)| *op == self)
            .map_or("?", |(s, _)| s)
    }
}

const SHAPE: &str = "a condition is [PLACE:TYPE OP NUMBER]: PLACE argN (N 1 to 6) or sp+OFFSET, \
                     TYPE i32, u32, i64 or u64, OP one of > >= < <= == !=, for example \
                     [sp+8:i32>1]";

impl FromStr for Predicate {
    type Err = String;

    fn from_str(s: &str) -> Result<Predicate, String> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        let (at, op, number) = (Op::WRITTEN.iter())
            .find_map(|(w, op)| s.split_once(w).map(|(a, n)| (a, *op, n)))
            .ok_or(SHAPE)?;
        let (place, kind) = match at.split_once(':') {
            Some((place, kind)) => (place, kind),
            None => (at, "i64"),
        };
        let place = if let Some(n) = place.strip_prefix("arg") {
            match n.parse::<u8>() {
                Ok(n @ 1..=6) => Place::Arg(n),
                _ => return Err(SHAPE.into()),
            }
        } else if let Some(offset) = place.strip_prefix("sp+") {
            let offset: u32 = offset.parse().map_err(|_| SHAPE)?;
            if offset > 4096 {
                return Err("a condition's stack offset is at most 4096".into());
            }
            Place::Stack(offset)
        } else {
            return Err(SHAPE.into());
        };
        let (width, signed) = match kind {
            "i32" => (4, true),
            "u32" => (4, false),
            "i64" => (8, true),
            "u64" => (8, false),
            _ => return Err(SHAPE.into()),
        };
        let value = parse_number(number).ok_or(SHAPE)?;
        let fits = match (width, signed) {
            (4, true) => i32::try_from(value).is_ok(),
            (4, false) => u32::try_from(value).is_ok(),
            (_, false) => value >= 0,
            _ => true,
        };
        if !fits {
            return Err(format!(
                "{number} does not fit in the condition's type {kind}"
            ));
        }
        Ok(Predicate {
            place,
            width,
            signed,
            op,
            value,
        })
    }
}

/// A decimal (signed) or `0x` hexadecimal number.
fn parse_number(s: &str) -> Option<i64> {
    match s.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

impl fmt::Display for Predicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.place {
            Place::Arg(n) => write!(f, "arg{n}")?,
            Place::Stack(offset) => write!(f, "sp+{offset}")?,
        }
        let kind = match (self.width, self.signed) {
            (4, true) => "i32",
            (4, false) => "u32",
            (_, true) => "i64",
            (_, false) => "u64",
        };
        write!(f, ":{kind}{}{}", self.op.written(), self.value)
    }
}

impl Predicate {
    /// As the kernel checks it.
    pub fn to_kernel(self) -> PhasePredicate {
        let (kind, at) = match self.place {
            Place::Arg(n) => (predicate::ARG, u32::from(n) - 1),
            Place::Stack(offset) => (predicate::STACK, offset),
        };
        PhasePredicate {
            kind,
            op: match self.op {
                Op::Gt => predicate::GT,
                Op::Ge => predicate::GE,
                Op::Lt => predicate::LT,
                Op::Le => predicate::LE,
                Op::Eq => predicate::EQ,
                Op::Ne => predicate::NE,
            },
            at,
            width: u32::from(self.width),
            signed: u32::from(self.signed),
            _pad: 0,
            value: self.value,
        }
    }
}

/// `SYMBOL[CONDITION]` split into the symbol and its condition (none without brackets).
pub fn split(symbol: &str) -> Result<(&str, Option<Predicate>), String> {
    let Some(open) = symbol.strip_suffix(']').and_then(|s| s.rfind('[')) else {
        return Ok((symbol, None));
    };
    let condition = &symbol[open + 1..symbol.len() - 1];
    Ok((&symbol[..open], Some(condition.parse()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_is_a_place_a_type_an_operator_and_a_number() {
        let p: Predicate = "sp+8:i32>1".parse().unwrap();
        assert_eq!(
            p,
            Predicate {
                place: Place::Stack(8),
                width: 4,
                signed: true,
                op: Op::Gt,
                value: 1
            }
        );
        assert_eq!(p.to_string(), "sp+8:i32>1");
        let q: Predicate = "arg2 >= 0x400".parse().unwrap();
        assert_eq!(q.to_string(), "arg2:i64>=1024");
        assert_eq!(q.to_kernel().at, 1);
        assert_eq!(q.to_kernel().kind, predicate::ARG);
        for bad in [
            "",
            "arg0>1",
            "arg7>1",
            "x>1",
            "sp+8:f32>1",
            "sp+8:u32>-1",
            "sp+9999>1",
        ] {
            assert!(bad.parse::<Predicate>().is_err(), "{bad}");
        }
        assert_eq!(split("llama_decode").unwrap(), ("llama_decode", None));
        let (symbol, p) = split("llama_decode[sp+8:i32<=1]").unwrap();
        assert_eq!((symbol, p.unwrap().op), ("llama_decode", Op::Le));
        assert!(split("f[nonsense]").is_err());
    }

    /// The kernel's comparison (`PhasePredicate::holds`) on what it reads: 8 bytes, of which
    /// the type's width count, signed or not.
    #[test]
    fn the_kernel_compares_the_width_and_sign_given() {
        let holds = |p: &str, raw: u64| p.parse::<Predicate>().unwrap().to_kernel().holds(raw);
        // An i32 of 5 with garbage above it (the next stack word's bytes).
        let five = 0xdead_beef_0000_0005;
        assert!(holds("sp+8:i32>1", five));
        assert!(!holds("sp+8:i32>1", 0xdead_beef_0000_0001));
        assert!(holds("sp+8:i32==5", five));
        assert!(holds("sp+8:i32<0", 0xffff_ffff));
        assert!(!holds("sp+8:u32<0x80000000", 0xffff_ffff));
        assert!(holds("arg1:u64>5", u64::MAX));
        assert!(!holds("arg1:i64>5", u64::MAX));
        assert!(holds("arg1!=3", 4) && !holds("arg1!=3", 3));
        assert!(holds("arg1<=3", 3) && holds("arg1>=3", 3) && !holds("arg1<3", 3));
    }
}
