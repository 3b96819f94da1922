//! Comma-separated `key=value` settings, as the operator writes them on one flag
//! (`--rollout canary=1,probation=10m`, `--shadow min-agreement=0.95`).

/// One `key=value` of a list, both trimmed, with the part as written for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pair<'a> {
    pub key: &'a str,
    pub value: &'a str,
    pub part: &'a str,
}

/// The pairs of `s` in order, empty parts skipped; a part without `=` is `Err` with the part.
pub fn pairs(s: &str) -> impl Iterator<Item = Result<Pair<'_>, &str>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|part| {
            let (key, value) = part.split_once('=').ok_or(part)?;
            Ok(Pair {
                key: key.trim(),
                value: value.trim(),
                part,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_trimmed_and_a_part_without_a_value_is_named() {
        let got: Vec<_> = pairs(" a = 1 ,, b=x=y ,").collect();
        assert_eq!(
            got,
            [
                Ok(Pair {
                    key: "a",
                    value: "1",
                    part: "a = 1"
                }),
                Ok(Pair {
                    key: "b",
                    value: "x=y",
                    part: "b=x=y"
                })
            ]
        );
        assert_eq!(pairs("a=1,oops").nth(1), Some(Err("oops")));
        assert_eq!(pairs(" , ").count(), 0);
    }
}
