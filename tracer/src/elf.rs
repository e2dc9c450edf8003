//! The ELF files a target maps, read the one way every reader shares: the probes' hooked
//! functions (`probes::resolve`), CPython's runtime symbols (`python`), the unwind sections
//! (`stacks::unwind`).
//!
//! Symbols come from `.dynsym` and `.symtab`: what callers bind to is in the first, while
//! hidden-visibility functions (a CUDA runtime linked in statically) and static executables'
//! functions are only in the second. An address stated in the file (a symbol's value) maps to
//! a file offset (what uprobes attach to) and, given a mapping of the file, to a run-time address
//! (the load bias), both through the `PT_LOAD` segments.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    fs::{self, File},
    io,
    ops::Range,
    path::{Path, PathBuf},
};

pub use object::{Architecture, ReadRef, SymbolKind};
use object::{
    CompressionFormat, Object, ObjectSection, ObjectSegment, ObjectSymbol, ReadCache, SegmentFlags,
};

use crate::model::PAGE;

/// Why an ELF file could not be had; names the file.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read `{path}`: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("`{path}` is not a readable ELF object: {source}")]
    Parse {
        path: PathBuf,
        source: object::Error,
    },
}

/// A file read on demand: only the parts parsed are read (the symbol tables, not all of a 1 GB
/// libtorch).
pub type OnDemand = ReadCache<File>;

/// All of the file at `path`, for readers that also read code bytes.
pub fn read(path: &Path) -> Result<Vec<u8>, ElfError> {
    fs::read(path).map_err(|source| ElfError::Read {
        path: path.into(),
        source,
    })
}

/// The file at `path`, read on demand.
pub fn open(path: &Path) -> Result<OnDemand, ElfError> {
    File::open(path)
        .map(on_demand)
        .map_err(|source| ElfError::Read {
            path: path.into(),
            source,
        })
}

/// An open file, read on demand.
pub fn on_demand(file: File) -> OnDemand {
    ReadCache::new(file)
}

/// The size of section `name` of the ELF file at `path` as stored (compressed, if it is), read
/// from its section headers alone; None when it has no such section or is not ELF. `Elf::parse`
/// reads the symbol tables too: for libtorch's, 15 MB of the tracer's heap for one number.
pub fn stored_section_size(path: &Path, name: &str) -> Option<u64> {
    use object::read::elf::{FileHeader, SectionHeader};
    fn size_in<Elf: FileHeader<Endian = object::Endianness>>(
        data: &OnDemand,
        name: &[u8],
    ) -> Option<u64> {
        let header = Elf::parse(data).ok()?;
        let endian = header.endian().ok()?;
        let sections = header.sections(endian, data).ok()?;
        let (_, section) = sections.section_by_name(endian, name)?;
        Some(section.sh_size(endian).into())
    }
    let data = open(path).ok()?;
    match object::FileKind::parse(&data).ok()? {
        object::FileKind::Elf64 => size_in::<object::elf::FileHeader64<_>>(&data, name.as_bytes()),
        object::FileKind::Elf32 => size_in::<object::elf::FileHeader32<_>>(&data, name.as_bytes()),
        _ => None,
    }
}

/// One symbol of `.dynsym` or `.symtab`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Symbol<'data> {
    pub name: &'data str,
    /// The value: an address as stated in the file (an offset in the TLS block for `Tls`).
    pub address: u64,
    pub size: u64,
    pub kind: SymbolKind,
    /// Whether the file defines it (an undefined symbol names what another object provides).
    pub defined: bool,
}

/// One `PT_LOAD` segment: which bytes of the file appear at which stated addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSegment {
    pub file_offset: u64,
    pub file_size: u64,
    pub address: u64,
    /// `PF_X`: mapped executable.
    pub executable: bool,
}

impl LoadSegment {
    /// The file offset of stated `address`, if the segment's file bytes hold it.
    pub fn file_offset_of(&self, address: u64) -> Option<u64> {
        let into = address
            .checked_sub(self.address)
            .filter(|&into| into < self.file_size)?;
        self.file_offset.checked_add(into)
    }

    /// Whether a mapping that starts at `file_offset` may map this segment: the loader maps a
    /// segment from the page of its first byte (a segment without file bytes still owns it).
    pub fn maps_offset(&self, file_offset: u64) -> bool {
        let first_page = self.file_offset & !(PAGE - 1);
        let end = self.file_offset.saturating_add(self.file_size.max(1));
        (first_page..end).contains(&file_offset)
    }

    /// The load bias (run-time address minus stated address) of a mapping of this segment that
    /// starts at run-time address `start` and file offset `file_offset`. The offset may be the
    /// segment's offset rounded down to its page, as the loader maps it.
    pub fn bias(&self, start: u64, file_offset: u64) -> Option<u64> {
        let stated = if file_offset >= self.file_offset {
            self.address.checked_add(file_offset - self.file_offset)?
        } else {
            self.address.checked_sub(self.file_offset - file_offset)?
        };
        Some(start.wrapping_sub(stated))
    }
}

/// The load bias of a mapping of an object with these segments that starts at run-time address
/// `start` and file offset `file_offset`, `executable` or not; `None` when no segment is mapped
/// there.
///
/// Two segments can share a page of the file: lld starts each segment in the page where the
/// previous one ends (`R` at offset 0 up to 0x1db654, `R E` from 0x1db660), so the mapping at
/// offset 0x1db000 is either's. The one with the mapping's permission is meant; of two with it,
/// the later (the earlier one's mapping starts at its own first page).
pub fn load_bias(
    segments: &[LoadSegment],
    start: u64,
    file_offset: u64,
    executable: bool,
) -> Option<u64> {
    segments
        .iter()
        .filter(|s| s.maps_offset(file_offset))
        .max_by_key(|s| s.executable == executable)?
        .bias(start, file_offset)
}

/// Bytes read at a time from a symbol or string table.
const TABLE_CHUNK: usize = 1 << 20;

/// Reads up to `buf.len()` bytes of `file` at `offset`; how many (0 at its end).
fn read_at(file: &File, offset: u64, buf: &mut [u8]) -> usize {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    done
}

/// The offsets in the string table at `[at, at + len)` of `file` where a wanted name starts:
/// the strings ending with it (a linker may keep one string for names that end alike).
fn wanted_name_offsets<'w>(
    file: &File,
    (at, len): (u64, u64),
    wanted: &[&'w str],
    chunk_len: usize,
) -> BTreeMap<u32, &'w str> {
    let mut found = BTreeMap::new();
    let mut chunk = vec![0u8; chunk_len];
    // The unfinished string the previous chunk ended with, and where it starts.
    let mut carry: Vec<u8> = Vec::new();
    let mut carry_at = 0u64;
    let mut pos = 0u64;
    while pos < len {
        let want = (len - pos).min(chunk_len as u64) as usize;
        let n = read_at(file, at + pos, &mut chunk[..want]);
        if n == 0 {
            break;
        }
        let mut start = 0;
        for (i, &b) in chunk[..n].iter().enumerate() {
            if b != 0 {
                continue;
            }
            let (string, string_at) = if carry.is_empty() {
                (&chunk[start..i], pos + start as u64)
            } else {
                carry.extend_from_slice(&chunk[..i]);
                (&carry[..], carry_at)
            };
            for w in wanted {
                if string.ends_with(w.as_bytes())
                    && let Ok(offset) = u32::try_from(string_at + (string.len() - w.len()) as u64)
                {
                    found.insert(offset, *w);
                }
            }
            carry.clear();
            start = i + 1;
        }
        if start < n {
            if carry.is_empty() {
                carry_at = pos + start as u64;
            }
            // A name longer than a megabyte is no hooked one: not kept whole.
            if carry.len() < TABLE_CHUNK {
                carry.extend_from_slice(&chunk[start..n]);
            }
        }
        pos += n as u64;
    }
    found
}

/// The defined functions of the symbol table at `[at, at + len)` of `file` whose name offset
/// is one of `names`: (name, stated address, size).
fn defined_functions<'w>(
    file: &File,
    (at, len): (u64, u64),
    names: &BTreeMap<u32, &'w str>,
    chunk_len: usize,
) -> Vec<(&'w str, u64, u64)> {
    const ENTRY: usize = 24; // Elf64_Sym
    let mut out = Vec::new();
    let mut chunk = vec![0u8; (chunk_len - chunk_len % ENTRY).max(ENTRY)];
    let mut pos = 0u64;
    while pos < len {
        let want = (len - pos).min(chunk.len() as u64) as usize;
        let n = read_at(file, at + pos, &mut chunk[..want]);
        let whole = n - n % ENTRY;
        if whole == 0 {
            break;
        }
        for sym in chunk[..whole].chunks_exact(ENTRY) {
            let word = |r: Range<usize>| -> u64 {
                sym[r].iter().rev().fold(0, |v, &b| (v << 8) | u64::from(b))
            };
            let Some(&name) = names.get(&(word(0..4) as u32)) else {
                continue;
            };
            let kind = sym[4] & 0xf; // STT_FUNC = 2, STT_GNU_IFUNC = 10
            let (shndx, address, size) = (word(6..8), word(8..16), word(16..24));
            if (kind == 2 || kind == 10) && shndx != 0 && address != 0 {
                out.push((name, address, size));
            }
        }
        pos += whole as u64;
    }
    out
}

/// The file offset of stated `address` in the file laid out in `segments`.
fn file_offset_in(segments: &[LoadSegment], address: u64) -> Option<u64> {
    segments.iter().find_map(|s| s.file_offset_of(address))
}

/// Where a symbol table and its string table are in a file: (table offset, table size,
/// strings offset, strings size).
type TableAt = (u64, u64, u64, u64);

/// A 64-bit ELF file's load segments and where its symbol tables are, read from its program
/// and section headers alone: what a search for a few names needs. `Elf::parse` reads the
/// symbol tables whole as well; the scan of every library a process maps for a static CUDA
/// runtime put libtorch_cpu's 15 MB of them in the tracer's heap.
pub struct Headers {
    segments: Vec<LoadSegment>,
    /// `.dynsym` first, as `Elf::symbols`.
    tables: Vec<TableAt>,
}

impl Headers {
    /// The headers of `file`, open at `path` (named in an error: not ELF, not 64-bit). Its
    /// tables are then streamed from the same handle, so both come from one file even if the
    /// path is replaced meanwhile.
    pub fn read(path: &Path, file: &File) -> Result<Headers, ElfError> {
        use object::read::elf::{FileHeader, ProgramHeader, SectionHeader};
        let data = file
            .try_clone()
            .map(on_demand)
            .map_err(|source| ElfError::Read {
                path: path.into(),
                source,
            })?;
        let parse_error = |source| ElfError::Parse {
            path: path.into(),
            source,
        };
        let header =
            object::elf::FileHeader64::<object::Endianness>::parse(&data).map_err(parse_error)?;
        let endian = header.endian().map_err(parse_error)?;
        let segments = header
            .program_headers(endian, &data)
            .map_err(parse_error)?
            .iter()
            .filter(|p| p.p_type(endian) == object::elf::PT_LOAD)
            .map(|p| LoadSegment {
                file_offset: p.p_offset(endian),
                file_size: p.p_filesz(endian),
                address: p.p_vaddr(endian),
                executable: p.p_flags(endian) & object::elf::PF_X != 0,
            })
            .collect();
        let sections = header.sections(endian, &data).map_err(parse_error)?;
        let mut tables = Vec::new();
        for kind in [object::elf::SHT_DYNSYM, object::elf::SHT_SYMTAB] {
            for s in sections.iter().filter(|s| s.sh_type(endian) == kind) {
                let index = object::SectionIndex(s.sh_link(endian) as usize);
                let Ok(strings) = sections.section(index) else {
                    continue;
                };
                tables.push((
                    s.sh_offset(endian),
                    s.sh_size(endian),
                    strings.sh_offset(endian),
                    strings.sh_size(endian),
                ));
            }
        }
        Ok(Headers { segments, tables })
    }

    /// The file offset of stated `address`.
    pub fn file_offset(&self, address: u64) -> Option<u64> {
        file_offset_in(&self.segments, address)
    }

    /// The (stated address, size) of each of the `wanted` functions the file defines, its
    /// symbol tables read from `file` (the one the headers were read from) a chunk at a time: memory
    /// stays bounded by the chunk whatever the size of the tables (a libtorch_cuda.so's
    /// `.strtab` is 73 MB of mangled names). `.dynsym` first, as `Elf::function_ranges`.
    pub fn function_ranges_streamed<'w>(
        &self,
        file: &File,
        wanted: &[&'w str],
    ) -> BTreeMap<&'w str, (u64, u64)> {
        self.function_ranges_in_chunks(file, wanted, TABLE_CHUNK)
    }

    fn function_ranges_in_chunks<'w>(
        &self,
        file: &File,
        wanted: &[&'w str],
        chunk: usize,
    ) -> BTreeMap<&'w str, (u64, u64)> {
        let mut ranges = BTreeMap::new();
        for &(sym_at, sym_len, str_at, str_len) in &self.tables {
            let names = wanted_name_offsets(file, (str_at, str_len), wanted, chunk);
            if names.is_empty() {
                continue;
            }
            let symbols = defined_functions(file, (sym_at, sym_len), &names, chunk);
            for (name, address, size) in symbols {
                ranges.entry(name).or_insert((address, size));
            }
        }
        ranges
    }
}

/// A parsed ELF file over its bytes (`&[u8]` of a file read whole, or `&OnDemand`).
pub struct Elf<'data, R: ReadRef<'data>> {
    file: object::File<'data, R>,
    segments: Vec<LoadSegment>,
}

impl<'data, R: ReadRef<'data>> Elf<'data, R> {
    /// Parses `data`, the contents of the file at `path` (named in the error).
    pub fn parse(path: &Path, data: R) -> Result<Self, ElfError> {
        let file = object::File::parse(data).map_err(|source| ElfError::Parse {
            path: path.into(),
            source,
        })?;
        let segments = file
            .segments()
            .map(|s| {
                let (file_offset, file_size) = s.file_range();
                LoadSegment {
                    file_offset,
                    file_size,
                    address: s.address(),
                    executable: matches!(
                        s.flags(),
                        SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0
                    ),
                }
            })
            .collect();
        Ok(Elf { file, segments })
    }

    /// Every symbol with a UTF-8 name: `.dynsym` first, then `.symtab` (a symbol in both comes
    /// twice).
    pub fn symbols(&self) -> impl Iterator<Item = Symbol<'data>> + '_ {
        self.file
            .dynamic_symbols()
            .chain(self.file.symbols())
            .filter_map(|s| {
                Some(Symbol {
                    name: s.name().ok()?,
                    address: s.address(),
                    size: s.size(),
                    kind: s.kind(),
                    defined: !s.is_undefined(),
                })
            })
    }

    /// File offsets of the `wanted` functions this file defines (`.dynsym` first: that is what
    /// callers bind to); names it does not define are absent.
    pub fn function_offsets<'w>(&self, wanted: &[&'w str]) -> BTreeMap<&'w str, u64> {
        let mut offsets = BTreeMap::new();
        let functions = self
            .symbols()
            .filter(|s| s.defined && s.kind == SymbolKind::Text && s.address != 0);
        for sym in functions {
            if let Some(w) = wanted.iter().find(|w| **w == sym.name)
                && !offsets.contains_key(w)
                && let Some(offset) = self.file_offset(sym.address)
            {
                offsets.insert(*w, offset);
            }
        }
        offsets
    }

    /// The (stated address, size) of each of the `wanted` functions the file defines, from the
    /// parsed tables: what `Headers::function_ranges_streamed` is checked against.
    #[cfg(test)]
    pub fn function_ranges<'w>(&self, wanted: &[&'w str]) -> BTreeMap<&'w str, (u64, u64)> {
        let mut ranges = BTreeMap::new();
        let functions = self
            .symbols()
            .filter(|s| s.defined && s.kind == SymbolKind::Text && s.address != 0);
        for sym in functions {
            if let Some(w) = wanted.iter().find(|w| **w == sym.name) {
                ranges.entry(*w).or_insert((sym.address, sym.size));
            }
        }
        ranges
    }

    /// The `PT_LOAD` segments, in program header order.
    pub fn load_segments(&self) -> &[LoadSegment] {
        &self.segments
    }

    /// The file offset of stated `address`.
    pub fn file_offset(&self, address: u64) -> Option<u64> {
        file_offset_in(&self.segments, address)
    }

    /// The `len` bytes the file holds at stated `address`.
    pub fn data_at(&self, address: u64, len: u64) -> Option<&'data [u8]> {
        self.file
            .segments()
            .find_map(|s| s.data_range(address, len).ok().flatten())
    }

    /// The GNU build id, if the file has a non-empty one.
    pub fn build_id(&self) -> Option<Vec<u8>> {
        let id = self.file.build_id().ok().flatten()?;
        (!id.is_empty()).then(|| id.to_vec())
    }

    pub fn architecture(&self) -> Architecture {
        self.file.architecture()
    }

    /// The stated addresses of section `name`.
    pub fn section_range(&self, name: &str) -> Option<Range<u64>> {
        let s = self.file.section_by_name(name)?;
        Some(s.address()..s.address().saturating_add(s.size()))
    }

    /// Where the bytes of section `name` are in the file (offset, size), when they are stored as
    /// they are: not compressed, not empty, not `SHT_NOBITS`.
    pub fn section_file_range(&self, name: &str) -> Option<(u64, u64)> {
        let s = self.file.section_by_name(name)?;
        let stored = s.compressed_file_range().ok()?;
        if stored.format != CompressionFormat::None {
            return None;
        }
        s.file_range().filter(|&(_, size)| size > 0)
    }

    /// The bytes of section `name`, decompressed; `None` when it is absent or cannot be read
    /// (compressed without support, truncated file).
    pub fn section_data(&self, name: &str) -> Option<Cow<'data, [u8]>> {
        self.file.section_by_name(name)?.uncompressed_data().ok()
    }

    /// The USDT probes the file declares (`.note.stapsdt`), at their stated addresses as the
    /// file is laid out now (a prelinked file's notes are moved by `.stapsdt.base`).
    pub fn usdt_probes(&self) -> Vec<UsdtProbe> {
        let Some(notes) = self.section_data(".note.stapsdt") else {
            return Vec::new();
        };
        let base = self.section_range(".stapsdt.base").map(|r| r.start);
        parse_stapsdt(&notes, base)
    }

    /// The function symbol whose range holds stated `address`: (its name, its start).
    pub fn function_at(&self, address: u64) -> Option<(&'data str, u64)> {
        self.symbols()
            .filter(|s| s.defined && s.kind == object::SymbolKind::Text && s.size > 0)
            .find(|s| (s.address..s.address.saturating_add(s.size)).contains(&address))
            .map(|s| (s.name, s.address))
    }
}

/// A USDT probe (`.note.stapsdt`): where the probe's `nop` is, and its semaphore (0: none; a
/// probe with one fires only while a tracer counts itself in it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsdtProbe {
    pub provider: String,
    pub name: String,
    pub address: u64,
    pub semaphore: u64,
}

/// The probes of a `.note.stapsdt` section: notes of type 3 named `stapsdt`, each (pc, base,
/// semaphore) then the provider's, the probe's and the arguments' C strings. `base`: where
/// `.stapsdt.base` is now, which the notes' addresses are relative to. Malformed notes end the
/// list.
fn parse_stapsdt(data: &[u8], base: Option<u64>) -> Vec<UsdtProbe> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
    };
    let align = |n: usize| n.div_ceil(4) * 4;
    let mut probes = Vec::new();
    let mut at = 0;
    while let (Some(namesz), Some(descsz), Some(kind)) = (word(at), word(at + 4), word(at + 8)) {
        let (namesz, descsz) = (namesz as usize, descsz as usize);
        let name_at = at + 12;
        let desc_at = name_at + align(namesz);
        let Some(desc) = data.get(desc_at..desc_at + descsz) else {
            break;
        };
        at = desc_at + align(descsz);
        if kind != 3 || data.get(name_at..name_at + namesz) != Some(b"stapsdt\0") {
            continue;
        }
        // pc, base, semaphore: 3 words, then the strings.
        let Some((words, strings)) = desc.split_first_chunk::<24>() else {
            continue;
        };
        let addr = |i: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&words[i * 8..i * 8 + 8]);
            u64::from_le_bytes(word)
        };
        let (pc, stated_base, semaphore) = (addr(0), addr(1), addr(2));
        let mut strings = strings.split(|&b| b == 0).map(String::from_utf8_lossy);
        let (Some(provider), Some(name)) = (strings.next(), strings.next()) else {
            continue;
        };
        // Prelinking moves the file; the notes keep the old addresses.
        let shift = |a: u64| match base {
            Some(now) if a != 0 => a.wrapping_add(now).wrapping_sub(stated_base),
            _ => a,
        };
        probes.push(UsdtProbe {
            provider: provider.into_owned(),
            name: name.into_owned(),
            address: shift(pc),
            semaphore: shift(semaphore),
        });
    }
    probes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `.note.stapsdt` as `sys/sdt.h` lays it out: two probes (the second with a semaphore),
    /// a note of another kind between them, and addresses stated against a `.stapsdt.base`
    /// that has moved by 0x1000 since.
    #[test]
    fn usdt_notes_give_each_probe_and_its_semaphore() {
        fn note(out: &mut Vec<u8>, name: &[u8], kind: u32, desc: &[u8]) {
            out.extend((name.len() as u32).to_le_bytes());
            out.extend((desc.len() as u32).to_le_bytes());
            out.extend(kind.to_le_bytes());
            out.extend(name);
            out.resize(out.len().div_ceil(4) * 4, 0);
            out.extend(desc);
            out.resize(out.len().div_ceil(4) * 4, 0);
        }
        let desc = |pc: u64, sem: u64, strings: &[u8]| {
            let mut d: Vec<u8> = [pc, 0x5000, sem]
                .iter()
                .flat_map(|a| a.to_le_bytes())
                .collect();
            d.extend(strings);
            d
        };
        let mut data = Vec::new();
        note(
            &mut data,
            b"stapsdt\0",
            3,
            &desc(0x1234, 0, b"server\0request__start\0\0"),
        );
        note(&mut data, b"GNU\0", 3, b"not a probe");
        note(
            &mut data,
            b"stapsdt\0",
            3,
            &desc(0x2000, 0x9000, b"py\0gc\0-4@%eax\0"),
        );
        let probes = parse_stapsdt(&data, Some(0x6000));
        let seen: Vec<(&str, &str, u64, u64)> = (probes.iter())
            .map(|p| (p.provider.as_str(), p.name.as_str(), p.address, p.semaphore))
            .collect();
        assert_eq!(
            seen,
            [
                ("server", "request__start", 0x2234, 0),
                ("py", "gc", 0x3000, 0xa000)
            ]
        );
        // Cut short: what is whole is kept, no panic.
        assert_eq!(
            parse_stapsdt(&data[..data.len() - 3], Some(0x6000)).len(),
            1
        );
    }

    /// The streamed search finds what the whole-table search finds, whatever the chunk (names
    /// and symbols cut across chunks), in the C library's .dynsym and this binary's .symtab.
    #[test]
    fn streamed_symbol_search_finds_what_the_whole_search_finds() {
        let exe = std::env::current_exe().unwrap();
        let libc = read_maps(std::process::id())
            .unwrap()
            .into_iter()
            .find(|m| is_libc_name(&m.path))
            .map(|m| PathBuf::from(m.path))
            .unwrap();
        let wanted = [
            "malloc",
            "free",
            "posix_memalign",
            "main",
            "no_such_function_anywhere",
            "streamed_symbol_search_finds_what_the_whole_search_finds",
        ];
        for path in [libc, exe] {
            let data = read(&path).unwrap();
            let elf = Elf::parse(&path, &*data).unwrap();
            let whole = elf.function_ranges(&wanted);
            let file = File::open(&path).unwrap();
            let headers = Headers::read(&path, &file).unwrap();
            assert_eq!(headers.segments, elf.load_segments(), "{}", path.display());
            for chunk in [7, 24, 4096, TABLE_CHUNK] {
                let streamed = headers.function_ranges_in_chunks(&file, &wanted, chunk);
                assert_eq!(streamed, whole, "{} in chunks of {chunk}", path.display());
            }
            assert!(!whole.is_empty(), "{}", path.display());
        }
    }
    use crate::{
        probes::resolve::is_libc_name,
        proc::maps::{Mapping, read_maps},
    };

    fn own_maps() -> Vec<Mapping> {
        read_maps(std::process::id()).unwrap()
    }

    /// The executable mapping of this process that holds run-time address `addr`.
    fn mapping_at(maps: &[Mapping], addr: u64) -> Mapping {
        maps.iter()
            .find(|m| m.executable && (m.start..m.end).contains(&addr))
            .unwrap_or_else(|| panic!("{addr:#x} is in no executable mapping"))
            .clone()
    }

    fn libc_path(maps: &[Mapping]) -> PathBuf {
        let m = maps
            .iter()
            .find(|m| m.executable && is_libc_name(&m.path))
            .expect("this process maps a C library");
        PathBuf::from(&m.path)
    }

    /// `malloc`'s file offset is where this process's libc mapping has the `malloc` it runs.
    #[test]
    fn libc_malloc_offset_is_where_it_is_mapped() {
        let maps = own_maps();
        // SAFETY: a NUL-terminated name; dlsym only looks it up.
        let addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"malloc".as_ptr()) } as u64;
        let m = mapping_at(&maps, addr);
        let data = read(&libc_path(&maps)).unwrap();
        let elf = Elf::parse(&libc_path(&maps), &*data).unwrap();
        let offsets = elf.function_offsets(&["malloc", "no_such_function"]);
        assert_eq!(
            offsets.get("malloc"),
            Some(&(addr - m.start + m.file_offset))
        );
        assert_eq!(offsets.len(), 1, "{offsets:?}");
        assert!(elf.build_id().is_some_and(|id| id.len() >= 8));

        let stated = elf
            .symbols()
            .find(|s| s.name == "malloc" && s.defined)
            .unwrap();
        let bias = load_bias(elf.load_segments(), m.start, m.file_offset, true).unwrap();
        assert_eq!(stated.address.wrapping_add(bias), addr);
    }

    #[inline(never)]
    fn elf_symtab_marker() -> u64 {
        std::hint::black_box(7)
    }

    /// Functions only in `.symtab` (this test binary's own, not exported) are found, read on
    /// demand, at the file offset and the load bias they run at (rustc links with lld: its
    /// executable segment starts in the page where the read-only one ends).
    #[test]
    fn symtab_functions_and_load_bias_of_this_binary() {
        let maps = own_maps();
        let addr = elf_symtab_marker as fn() -> u64 as usize as u64;
        assert_eq!(elf_symtab_marker(), 7);
        let m = mapping_at(&maps, addr);
        let path = PathBuf::from(&m.path);
        let data = open(&path).unwrap();
        let elf = Elf::parse(&path, &data).unwrap();
        let marker = elf
            .symbols()
            .find(|s| s.name.contains("elf_symtab_marker") && s.kind == SymbolKind::Text)
            .expect("the marker function is in .symtab");
        let bias = load_bias(elf.load_segments(), m.start, m.file_offset, true).unwrap();
        assert_eq!(marker.address.wrapping_add(bias), addr);
        assert_eq!(
            elf.file_offset(marker.address),
            Some(addr - m.start + m.file_offset)
        );
        assert_eq!(elf.architecture(), Architecture::X86_64);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.so");
        let err = read(&missing).unwrap_err();
        assert!(matches!(err, ElfError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("missing.so"), "{err}");
        assert!(matches!(open(&missing), Err(ElfError::Read { .. })));

        let text = dir.path().join("notes.txt");
        fs::write(&text, "not an ELF file").unwrap();
        let err = Elf::parse(&text, &*read(&text).unwrap()).err().unwrap();
        assert!(matches!(err, ElfError::Parse { .. }), "{err:?}");
        assert!(err.to_string().contains("notes.txt"), "{err}");
    }

    #[test]
    fn segments_map_offsets_and_addresses() {
        // A segment at file offset 0x1234 stated at 0x401234, 0x100 bytes in the file.
        let s = LoadSegment {
            file_offset: 0x1234,
            file_size: 0x100,
            address: 0x40_1234,
            executable: true,
        };
        assert_eq!(s.file_offset_of(0x40_1240), Some(0x1240));
        assert_eq!(s.file_offset_of(0x40_1334), None, "past the file bytes");
        assert_eq!(s.file_offset_of(0x40_1000), None);
        assert_eq!(s.file_offset_of(u64::MAX), None);
        // Mapped from its page, 0x1000, at 0x7f00_0000_0000.
        assert_eq!(
            s.bias(0x7f00_0000_0000, 0x1000),
            Some(0x7f00_0000_0000 - 0x40_1000)
        );
        assert!(!s.maps_offset(0xfff) && s.maps_offset(0x1000) && !s.maps_offset(0x1334));
        let empty = LoadSegment { file_size: 0, ..s };
        assert!(empty.maps_offset(0x1234));
        let far = LoadSegment {
            address: u64::MAX,
            ..s
        };
        assert_eq!(far.bias(0, 0x2000), None);
        let garbage = LoadSegment {
            file_offset: u64::MAX,
            ..s
        };
        assert_eq!(garbage.file_offset_of(0x40_1240), None);
        assert_eq!(
            load_bias(&[s], 0x7f00_0000_5000, 0x1240, true),
            Some(0x7f00_0000_5000 - 0x40_1240)
        );
        assert_eq!(load_bias(&[s], 0x7f00_0000_5000, 0x9000, true), None);
    }

    /// lld's layout (this test binary's): segments share the pages where they meet.
    #[test]
    fn shared_pages_belong_to_the_segment_with_the_mappings_permission() {
        let segment = |file_offset, address, file_size, executable| LoadSegment {
            file_offset,
            file_size,
            address,
            executable,
        };
        let segments = [
            segment(0, 0, 0x1d_b654, false),
            segment(0x1d_b660, 0x1d_c660, 0x63_f580, true),
            segment(0x81_abe0, 0x81_cbe0, 0x3_6ac8, false),
            segment(0x85_16a8, 0x85_46a8, 0x60b8, false),
        ];
        let base = 0x5555_0000_0000;
        let bias = |start_page: u64, offset, executable| {
            load_bias(&segments, base + start_page, offset, executable)
        };
        assert_eq!(bias(0, 0, false), Some(base));
        assert_eq!(bias(0x1d_c000, 0x1d_b000, true), Some(base));
        assert_eq!(bias(0x81_c000, 0x81_a000, false), Some(base));
        assert_eq!(bias(0x85_4000, 0x85_1000, false), Some(base));
    }

    /// A section's stored size read from the section headers alone is the one the full parse
    /// gives: for a `-g` build's `.debug_info`, and for a compressed one (`-gz`), smaller; a
    /// missing section and a file that is not ELF have none.
    #[test]
    fn a_sections_stored_size_comes_from_its_header_alone() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("g.c");
        std::fs::write(&src, "int main(void) { return 0; }\n").unwrap();
        let build = |name: &str, flags: &[&str]| {
            let exe = dir.path().join(name);
            let status = std::process::Command::new("cc")
                .args(flags)
                .arg("-o")
                .arg(&exe)
                .arg(&src)
                .status()
                .unwrap();
            assert!(status.success());
            exe
        };
        let full_parse = |exe: &Path| {
            let data = read(exe).unwrap();
            let elf = Elf::parse(exe, &*data).unwrap();
            let range = elf.section_range(".debug_info").unwrap();
            range.end - range.start
        };
        let plain = build("plain", &["-g"]);
        let compressed = build("compressed", &["-g", "-gz=zlib"]);
        let plain_size = stored_section_size(&plain, ".debug_info").unwrap();
        let compressed_size = stored_section_size(&compressed, ".debug_info").unwrap();
        assert_eq!(plain_size, full_parse(&plain));
        assert_eq!(compressed_size, full_parse(&compressed));
        assert!(0 < compressed_size && compressed_size < plain_size);
        assert_eq!(stored_section_size(&plain, ".no_such_section"), None);
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "not ELF").unwrap();
        assert_eq!(stored_section_size(&text, ".debug_info"), None);
    }
}
