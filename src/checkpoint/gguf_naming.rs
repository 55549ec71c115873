//! The `general.*` naming metadata llama.cpp's converter writes, and its file names: a port of
//! gguf-py's `Metadata.get_model_id_components` / `id_to_title` (`gguf/metadata.py`) and
//! `size_label` / `naming_convention` (`gguf/utility.py`), step for step.
//!
//! The converter takes the model's name from `config.json`'s `_name_or_path` when it looks like a hub
//! id (at most one `/`), else from the checkpoint folder's name. [`GeneralNames::from_name_or_path`]
//! does the same with the name the model was loaded under (a folder path counts by its last part).
//! Differences: Python's Unicode `isdecimal` / `\d` are ASCII digits here, and a model card
//! (`README.md` front matter) is not read.

/// The naming parts of a model id (`HuggingFaceTB/SmolVLM-256M-Instruct`), as gguf-py splits it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelIdComponents {
    /// The id without its organization (`SmolVLM-256M-Instruct`).
    pub full_name: Option<String>,
    pub organization: Option<String>,
    pub basename: Option<String>,
    pub finetune: Option<String>,
    pub version: Option<String>,
    pub size_label: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Tag {
    Basename,
    SizeLabel,
    Finetune,
    Version,
    Type,
}

fn ieq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Leading ASCII digits of `s` (at least one) and the rest.
fn digits(s: &str) -> Option<&str> {
    let n = s.bytes().take_while(u8::is_ascii_digit).count();
    (n > 0).then(|| &s[n..])
}

/// `(v|iter)?\d+([.]\d+)*`, ignoring case.
fn is_version(p: &str) -> bool {
    let lower = p.to_ascii_lowercase();
    let body = lower.strip_prefix("iter").or_else(|| lower.strip_prefix('v')).unwrap_or(&lower);
    let full = |mut s: &str| loop {
        match digits(s) {
            None => return false,
            Some("") => return true,
            Some(r) => match r.strip_prefix('.') {
                Some(r) => s = r,
                None => return false,
            },
        }
    };
    full(body) || full(&lower)
}

/// `i?q\d(_\w)*|b?fp?(16|32)`, ignoring case.
fn is_quant_type(p: &str) -> bool {
    let l = p.to_ascii_lowercase();
    let q = l.strip_prefix('i').unwrap_or(&l);
    if let Some(r) = q.strip_prefix('q') {
        let mut c = r.chars();
        if c.next().is_some_and(|d| d.is_ascii_digit()) {
            let rest: Vec<char> = c.collect();
            if rest.len().is_multiple_of(2)
                && rest.chunks(2).all(|g| g[0] == '_' && (g[1].is_alphanumeric() || g[1] == '_'))
            {
                return true;
            }
        }
    }
    let f = l.strip_prefix('b').unwrap_or(&l);
    let f = match f.strip_prefix('f') {
        Some(r) => r.strip_prefix('p').unwrap_or(r),
        None => return false,
    };
    f == "16" || f == "32"
}

/// `\d+([._]\d+)?[KMBT][\d]?` (the part after an optional `A` or `\d+x` prefix), ignoring case.
fn is_size_core(s: &str) -> bool {
    let Some(mut r) = digits(s) else { return false };
    if let Some(after) = r.strip_prefix(['.', '_']) {
        match digits(after) {
            Some(x) => r = x,
            None => return false,
        }
    }
    let mut c = r.chars();
    if !c.next().is_some_and(|u| "kmbtKMBT".contains(u)) {
        return false;
    }
    let rest = c.as_str();
    rest.is_empty() || (rest.len() == 1 && rest.as_bytes()[0].is_ascii_digit())
}

/// `(([A]|\d+[x])?\d+([._]\d+)?[KMBT][\d]?|small|mini|medium|large|x?xl)`, ignoring case.
fn is_size_label(p: &str) -> bool {
    if ["small", "mini", "medium", "large", "xl", "xxl"].iter().any(|w| ieq(p, w)) {
        return true;
    }
    if is_size_core(p) {
        return true;
    }
    if let Some(r) = p.strip_prefix(['a', 'A']) {
        if is_size_core(r) {
            return true;
        }
    }
    // `\d+x` prefix: any run of digits followed by an x
    if let Some(r) = digits(p) {
        if let Some(r) = r.strip_prefix(['x', 'X']) {
            return is_size_core(r);
        }
    }
    false
}

/// gguf-py's `get_model_id_components(model_id, total_params)`.
pub fn model_id_components(model_id: &str, total_params: i64) -> ModelIdComponents {
    if model_id.contains(' ') {
        return ModelIdComponents { full_name: Some(model_id.to_string()), ..Default::default() };
    }
    let (mut org, full) = match model_id.split_once('/') {
        Some((o, f)) => (Some(o.to_string()), f.to_string()),
        None => (None, model_id.to_string()),
    };
    if org.as_deref().is_some_and(|o| o.starts_with('.')) {
        org = None;
    }
    let mut parts: Vec<String> = full.split('-').filter(|p| !p.is_empty()).map(str::to_string).collect();
    let mut tags: Vec<Vec<Tag>> = vec![Vec::new(); parts.len()];
    for i in 0..parts.len() {
        let part = parts[i].clone();
        if is_version(&part) {
            tags[i].push(Tag::Version);
        } else if is_quant_type(&part) {
            tags[i].push(Tag::Type);
            parts[i] = part.to_uppercase();
        } else if i > 0 && is_size_label(&part) {
            let mut p: Vec<char> = part.replace('_', ".").chars().collect();
            let n = p.len();
            if n >= 2 && p[n - 1].is_ascii_digit() {
                // bloom-7b1 -> 7.1b
                let (a, b) = (p[n - 2], p[n - 1]);
                p.truncate(n - 2);
                p.extend(['.', b, a]);
            }
            let n = p.len();
            if n > 1 && p[n - 2].is_ascii_digit() && "kmbt".contains(p[n - 1]) {
                p[n - 1] = p[n - 1].to_ascii_uppercase();
            }
            if total_params != 0 {
                let head: String = p[..p.len() - 1].iter().collect();
                if let Ok(v) = head.parse::<f64>() {
                    let exp = " KMBT".find(p[p.len() - 1]).map_or(-1, |e| e as i32);
                    let label = v * 1000f64.powi(exp);
                    let t = total_params as f64;
                    let small = total_params < 0 && label < (total_params.abs() / 8) as f64;
                    let far = total_params > 0 && (label - t).abs() > (7 * total_params / 8) as f64;
                    if small || far {
                        // likely a context length
                        tags[i].push(Tag::Finetune);
                        let last = p.len() - 1;
                        p[last] = p[last].to_ascii_lowercase();
                    }
                }
            }
            if tags[i].is_empty() {
                tags[i].push(Tag::SizeLabel);
            }
            parts[i] = p.into_iter().collect();
        } else if i > 0 && ["chat", "instruct", "vision", "lora"].iter().any(|w| ieq(&part, w)) {
            tags[i].push(if total_params < 0 && ieq(&part, "lora") { Tag::Type } else { Tag::Finetune });
        }
    }
    let numeric_size =
        parts.iter().zip(&tags).any(|(n, t)| t.contains(&Tag::SizeLabel) && n.chars().any(|c| c.is_ascii_digit()));
    if numeric_size {
        for (n, t) in parts.iter().zip(tags.iter_mut()) {
            if t.contains(&Tag::SizeLabel) && n.chars().all(char::is_alphabetic) {
                t.retain(|x| *x != Tag::SizeLabel);
            }
        }
    }
    let mut at_start = true;
    for (part, t) in parts.iter().zip(tags.iter_mut()) {
        let alpha_start = part.chars().next().is_some_and(char::is_alphabetic);
        if at_start && ((t.is_empty() && alpha_start) || t.contains(&Tag::Version)) {
            t.push(Tag::Basename);
        } else {
            at_start = false;
            if t.is_empty() {
                t.push(Tag::Finetune);
            }
        }
    }
    for t in tags.iter_mut().rev() {
        if t.contains(&Tag::Basename) && t.len() > 1 {
            t.retain(|x| *x != Tag::Basename);
        } else {
            break;
        }
    }
    let join = |want: Tag, skip: Option<Tag>| {
        let mut seen: Vec<&str> = Vec::new();
        for (n, t) in parts.iter().zip(&tags) {
            if t.contains(&want)
                && !skip.is_some_and(|s| t.contains(&s))
                && !(want == Tag::SizeLabel && seen.contains(&n.as_str()))
            {
                seen.push(n);
            }
        }
        (!seen.is_empty()).then(|| seen.join("-"))
    };
    let mut basename = join(Tag::Basename, None);
    let size_label = join(Tag::SizeLabel, None);
    let finetune = join(Tag::Finetune, None);
    let version = join(Tag::Version, Some(Tag::Basename));
    if size_label.is_none() && finetune.is_none() && version.is_none() {
        basename = None; // too ambiguous
    }
    ModelIdComponents { full_name: Some(full), organization: org, basename, finetune, version, size_label }
}

/// Python's `str.title()`: a cased character is upper case after an uncased one, lower case after
/// a cased one.
fn py_title(w: &str) -> String {
    let mut out = String::with_capacity(w.len());
    let mut prev_cased = false;
    for c in w.chars() {
        let cased = c.is_lowercase() || c.is_uppercase();
        if cased && prev_cased {
            out.extend(c.to_lowercase());
        } else if cased {
            out.extend(c.to_uppercase());
        } else {
            out.push(c);
        }
        prev_cased = cased;
    }
    out
}

/// gguf-py's `Metadata.id_to_title`: words split on `-` and spaces, an all-lower-case word title-cased
/// unless it is a version (`v1.2`) or starts with a digit.
pub fn id_to_title(s: &str) -> String {
    let keep = |w: &str| {
        let version = w.strip_prefix('v').and_then(|r| {
            let mut r = digits(r)?;
            while let Some(x) = r.strip_prefix('.') {
                r = digits(x)?;
            }
            r.is_empty().then_some(())
        });
        version.is_some() || w.chars().next().is_some_and(|c| c.is_ascii_digit())
    };
    let is_lower = |w: &str| w.chars().any(|c| c.is_lowercase()) && !w.chars().any(|c| c.is_uppercase());
    s.trim()
        .replace('-', " ")
        .split_whitespace()
        .map(|w| if is_lower(w) && !keep(w) { py_title(w) } else { w.to_string() })
        .collect::<Vec<_>>()
        .join(" ")
}

/// gguf-py's `model_weight_count_rounded_notation(n, min_digits=2)`: "29K", "1.6M", "135M".
pub fn size_label(total_params: u64) -> String {
    let n = total_params as f64;
    let (scaled, suffix) = if n > 1e12 {
        (n * 1e-12, "T")
    } else if n > 1e9 {
        (n * 1e-9, "B")
    } else if n > 1e6 {
        (n * 1e-6, "M")
    } else {
        (n * 1e-3, "K")
    };
    let rounded = format!("{}", scaled.round_ties_even() as u64);
    let digits = rounded.trim_start_matches('0').len();
    let fix = 2usize.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

/// What the converter writes under `general.*` for a model's name.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneralNames {
    pub name: String,
    pub version: Option<String>,
    pub organization: Option<String>,
    pub finetune: Option<String>,
    pub basename: Option<String>,
    pub size_label: Option<String>,
}

impl GeneralNames {
    /// The converter's heuristics on `name_or_path` (a hub id or a folder path), for a file holding
    /// `total_params` values: an id with at most one `/` is read as `org/name`, a longer path by its
    /// last part (the folder name). The size label falls back to [`size_label`] of the count.
    pub fn from_name_or_path(name_or_path: &str, total_params: u64) -> Self {
        let trimmed = name_or_path.trim_end_matches('/');
        let id =
            if trimmed.matches('/').count() <= 1 { trimmed } else { trimmed.rsplit('/').next().unwrap_or(trimmed) };
        let c = model_id_components(id, total_params as i64);
        let name = c.full_name.as_deref().map(id_to_title).filter(|n| !n.is_empty());
        GeneralNames {
            name: name.unwrap_or_else(|| id.to_string()),
            version: c.version,
            organization: c.organization.as_deref().map(id_to_title),
            finetune: c.finetune,
            basename: c.basename,
            size_label: c.size_label.or_else(|| (total_params > 0).then(|| size_label(total_params))),
        }
    }

    /// gguf-py's `naming_convention`: `<basename or name>[-size][-finetune][-version][-TYPE]`, spaces
    /// and slashes turned into dashes (`SmolVLM-256M-Instruct-F16`).
    pub fn file_stem(&self, with_size: bool, output_type: &str) -> String {
        let dash = |s: &str| s.trim().replace(' ', "-");
        let base = self.basename.as_deref().unwrap_or(&self.name).trim().replace([' ', '/'], "-");
        let mut out = base;
        if let (true, Some(s)) = (with_size, &self.size_label) {
            out += &format!("-{s}");
        }
        if let Some(f) = &self.finetune {
            out += &format!("-{}", dash(f));
        }
        if let Some(v) = &self.version {
            out += &format!("-{}", dash(v));
        }
        out += &format!("-{}", dash(output_type).to_uppercase());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_the_converter_fixtures() {
        // tests/fixtures/gguf_export/expected.json: the converter on folders with these names
        let n = GeneralNames::from_name_or_path("/tmp/x/smolvlm_tied", 28704);
        assert_eq!((n.name.as_str(), n.size_label.as_deref()), ("Smolvlm_Tied", Some("29K")));
        let n = GeneralNames::from_name_or_path("idefics3_gqa", 78_720);
        assert_eq!((n.name.as_str(), n.size_label.as_deref()), ("Idefics3_Gqa", Some("79K")));
        let n = GeneralNames::from_name_or_path("/a/b/SmolVLM-Tiny", 1_600_000);
        assert_eq!(
            (n.name.as_str(), n.basename.as_deref(), n.size_label.as_deref()),
            ("SmolVLM Tiny", None, Some("1.6M"))
        );
    }

    #[test]
    fn hub_ids_split_like_gguf_py() {
        let c = model_id_components("HuggingFaceTB/SmolVLM-256M-Instruct", 256_000_000);
        assert_eq!(c.organization.as_deref(), Some("HuggingFaceTB"));
        assert_eq!(c.basename.as_deref(), Some("SmolVLM"));
        assert_eq!(c.size_label.as_deref(), Some("256M"));
        assert_eq!(c.finetune.as_deref(), Some("Instruct"));
        // a size far from the parameter count is a context length: kept lower case, as a finetune
        let c = model_id_components("SmolVLM-256M-Instruct", 135_000_000);
        assert_eq!((c.size_label, c.finetune.as_deref()), (None, Some("256m-Instruct")));
        let c = model_id_components("bloom-7b1", 7_100_000_000);
        assert_eq!(c.size_label.as_deref(), Some("7.1B"));
        let c = model_id_components("Mixtral-8x7B-v0.1", 0);
        assert_eq!((c.size_label.as_deref(), c.version.as_deref()), (Some("8x7B"), Some("v0.1")));
        let c = model_id_components("SmolLM2-135M-Instruct-Q4_K_M", 0);
        assert_eq!(c.basename.as_deref(), Some("SmolLM2"));
        let n = GeneralNames::from_name_or_path("HuggingFaceTB/SmolVLM-256M-Instruct", 256_000_000);
        assert_eq!(n.file_stem(true, "f16"), "SmolVLM-256M-Instruct-F16");
        assert_eq!(n.file_stem(false, "Q8_0"), "SmolVLM-Instruct-Q8_0");
    }

    #[test]
    fn titles_and_size_labels() {
        assert_eq!(id_to_title("llama-3.1-v2-8b"), "Llama 3.1 v2 8b");
        assert_eq!(id_to_title("a3b_x"), "A3B_X");
        assert_eq!(size_label(28_704), "29K");
        assert_eq!(size_label(1_576_960), "1.6M");
        assert_eq!(size_label(134_515_008), "135M");
        assert_eq!(size_label(500), "0.50K");
    }
}
