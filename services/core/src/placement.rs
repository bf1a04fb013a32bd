//! Which expert shard hosts which routed experts. Default: whole routing groups per shard when
//! the groups divide evenly (a token then reaches at most `topk_group` shards), else contiguous
//! ranges with the first `E mod N` shards taking one extra expert (the Helm chart uses the same
//! rule). A placement file lists each shard's experts explicitly.

use std::path::Path;

use crate::config::ModelConfig;
use crate::error::{CoreError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementKind {
    Groups,
    Contiguous,
}

/// Expert ids per shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub shards: Vec<Vec<usize>>,
}

impl Placement {
    /// The default for `n_shards` shards: groups when they divide evenly, else contiguous.
    pub fn default_for(cfg: &ModelConfig, n_shards: usize) -> Result<Self> {
        let kind = if cfg.n_group > 1 && cfg.n_group.is_multiple_of(n_shards.max(1)) {
            PlacementKind::Groups
        } else {
            PlacementKind::Contiguous
        };
        Self::build(cfg, n_shards, kind)
    }

    pub fn build(cfg: &ModelConfig, n_shards: usize, kind: PlacementKind) -> Result<Self> {
        let e = cfg.n_routed_experts;
        if n_shards == 0 || n_shards > e {
            return Err(CoreError::InvalidInput(format!(
                "cannot place {e} routed experts on {n_shards} shards (need 1..={e} shards)"
            )));
        }
        let shards = match kind {
            PlacementKind::Groups => {
                if !cfg.n_group.is_multiple_of(n_shards) {
                    return Err(CoreError::InvalidInput(format!(
                        "groups placement needs the {} routing groups to divide evenly over {n_shards} shards; use contiguous placement",
                        cfg.n_group
                    )));
                }
                let per_group = e / cfg.n_group;
                let groups_per_shard = cfg.n_group / n_shards;
                (0..n_shards)
                    .map(|s| {
                        (s * groups_per_shard * per_group..(s + 1) * groups_per_shard * per_group)
                            .collect()
                    })
                    .collect()
            }
            PlacementKind::Contiguous => {
                let (base, extra) = (e / n_shards, e % n_shards);
                let mut start = 0;
                (0..n_shards)
                    .map(|s| {
                        let len = base + usize::from(s < extra);
                        let r: Vec<usize> = (start..start + len).collect();
                        start += len;
                        r
                    })
                    .collect()
            }
        };
        Ok(Placement { shards })
    }

    /// Reads `{"shards": [[0, 1, ...], [...]]}`; an expert may appear on several shards
    /// (replicas: the router spreads its rows over them and fails over between them).
    pub fn from_file(path: &Path, cfg: &ModelConfig) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| CoreError::File {
            path: path.into(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let shards = v["shards"]
            .as_array()
            .ok_or_else(|| CoreError::File {
                path: path.into(),
                msg: "expected {\"shards\": [[expert ids], ...]}".into(),
            })?
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_array()
                    .ok_or_else(|| CoreError::File {
                        path: path.into(),
                        msg: format!("shards[{i}] is not a list"),
                    })?
                    .iter()
                    .map(|x| {
                        x.as_u64()
                            .map(|x| x as usize)
                            .ok_or_else(|| CoreError::File {
                                path: path.into(),
                                msg: format!("shards[{i}] holds {x}, not an expert id"),
                            })
                    })
                    .collect::<Result<Vec<usize>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let p = Placement { shards };
        p.check(cfg).map_err(|e| CoreError::File {
            path: path.into(),
            msg: e.to_string(),
        })?;
        Ok(p)
    }

    /// Every expert hosted at least once, and nothing out of range.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        let mut seen = vec![false; cfg.n_routed_experts];
        for (i, s) in self.shards.iter().enumerate() {
            for &e in s {
                let slot = seen.get_mut(e).ok_or_else(|| {
                    CoreError::InvalidInput(format!(
                        "shard {i} lists expert {e}, but the model has {} experts",
                        cfg.n_routed_experts
                    ))
                })?;
                *slot = true;
            }
        }
        if let Some(missing) = seen.iter().position(|s| !s) {
            return Err(CoreError::InvalidInput(format!(
                "expert {missing} is not hosted by any shard"
            )));
        }
        Ok(())
    }

    /// This placement with every expert on `replicas` shards: shard `s` also takes the experts
    /// of shards `s+1 .. s+replicas-1` (mod the shard count). Chained rather than mirrored pairs
    /// so any shard count works, each shard holds `replicas / n` of the experts, and whole
    /// routing groups stay together (a groups placement keeps its locality).
    pub fn replicated(&self, replicas: usize) -> Result<Self> {
        let n = self.shards.len();
        if replicas == 0 || replicas > n {
            return Err(CoreError::InvalidInput(format!(
                "--replicas {replicas}: need 1..={n} (each expert on that many of the {n} shards)"
            )));
        }
        let shards = (0..n)
            .map(|s| {
                let mut mine: Vec<usize> = (0..replicas)
                    .flat_map(|j| self.shards[(s + j) % n].iter().copied())
                    .collect();
                mine.sort_unstable();
                mine.dedup();
                mine
            })
            .collect();
        Ok(Placement { shards })
    }

    /// The experts grouped by the exact set of shards hosting them, ordered by that set (so
    /// without replicas: one set per shard, in shard order). A set is the unit the router sends
    /// to one of its owners and sums in this order, so a result does not depend on which
    /// replica computed it.
    pub fn replica_sets(&self, n_experts: usize) -> Vec<ReplicaSet> {
        let mut owners: Vec<Vec<usize>> = vec![Vec::new(); n_experts];
        for (s, experts) in self.shards.iter().enumerate() {
            for &e in experts {
                if let Some(o) = owners.get_mut(e)
                    && o.last() != Some(&s)
                {
                    o.push(s);
                }
            }
        }
        let mut sets = std::collections::BTreeMap::<Vec<usize>, Vec<usize>>::new();
        for (e, o) in owners.into_iter().enumerate() {
            if !o.is_empty() {
                sets.entry(o).or_default().push(e);
            }
        }
        sets.into_iter()
            .map(|(owners, experts)| ReplicaSet { experts, owners })
            .collect()
    }

    /// For each expert, the shard serving it.
    pub fn owner_table(&self, n_experts: usize) -> Vec<usize> {
        let mut owner = vec![usize::MAX; n_experts];
        for (s, experts) in self.shards.iter().enumerate() {
            for &e in experts {
                if e < n_experts && owner[e] == usize::MAX {
                    owner[e] = s;
                }
            }
        }
        owner
    }
}

/// Experts hosted by exactly the same shards (see [`Placement::replica_sets`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSet {
    /// Ascending expert ids.
    pub experts: Vec<usize>,
    /// Ascending shard indices, at least one.
    pub owners: Vec<usize>,
}

/// Experts that more than one shard has loaded (`hosted[s]`: the experts shard `s` reports),
/// ascending. Transports that split rows by [`Placement::owner_table`] ignore such replicas;
/// one that hands every shard all rows (NCCL decode slots) would add them twice.
pub fn experts_on_several_shards(hosted: &[Vec<usize>]) -> Vec<usize> {
    let mut seen = std::collections::BTreeMap::<usize, usize>::new();
    for experts in hosted {
        let mut mine = experts.clone();
        mine.sort_unstable();
        mine.dedup();
        for e in mine {
            *seen.entry(e).or_default() += 1;
        }
    }
    seen.into_iter()
        .filter(|&(_, n)| n > 1)
        .map(|(e, _)| e)
        .collect()
}

/// One shard's share of a MoE layer: the rows (ascending) that chose at least one of its experts,
/// with all `top_k` slots of each row: the shard's own expert ids and gate weights, other shards'
/// slots padded with [`crate::routing::NO_EXPERT`] and weight 0.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardRows {
    pub rows: Vec<usize>,
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Splits a layer's routing over `shards` shards by `owner` (expert -> shard, from
/// [`Placement::owner_table`]). Every transport uses this one split, so they send the same rows
/// in the same order and their results can be compared bit for bit.
pub fn split_rows(
    routing: &crate::routing::Routing,
    owner: &[usize],
    shards: usize,
) -> Vec<ShardRows> {
    let mut out = vec![ShardRows::default(); shards];
    for r in 0..routing.rows() {
        let (ids, ws) = routing.row(r);
        for (s, entry) in out.iter_mut().enumerate() {
            if !ids.iter().any(|&e| owner.get(e as usize) == Some(&s)) {
                continue;
            }
            entry.rows.push(r);
            for (&e, &w) in ids.iter().zip(ws) {
                if owner.get(e as usize) == Some(&s) {
                    entry.ids.push(e);
                    entry.weights.push(w);
                } else {
                    entry.ids.push(crate::routing::NO_EXPERT);
                    entry.weights.push(0.0);
                }
            }
        }
    }
    out
}

/// Parses "0-79", "0,5,7-9" into expert ids.
pub fn parse_expert_list(s: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || {
            CoreError::InvalidInput(format!(
                "--experts: `{part}` is not an expert id or FIRST-LAST range"
            ))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                );
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        return Err(CoreError::InvalidInput(
            "--experts: no experts given".into(),
        ));
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn split_rows_pads_other_shards_slots() {
        use crate::routing::{NO_EXPERT, Routing};
        // experts 0,1 on shard 0; 2,3 on shard 1; k = 2; three rows
        let owner = vec![0, 0, 1, 1];
        let routing = Routing {
            top_k: 2,
            ids: vec![0, 1, 2, 0, 3, 2],
            weights: vec![0.5, 0.25, 0.75, 0.125, 1.0, 2.0],
        };
        let s = split_rows(&routing, &owner, 2);
        assert_eq!(s[0].rows, vec![0, 1]);
        assert_eq!(s[0].ids, vec![0, 1, NO_EXPERT, 0]);
        assert_eq!(s[0].weights, vec![0.5, 0.25, 0.0, 0.125]);
        assert_eq!(s[1].rows, vec![1, 2]);
        assert_eq!(s[1].ids, vec![2, NO_EXPERT, 3, 2]);
        assert_eq!(s[1].weights, vec![0.75, 0.0, 1.0, 2.0]);
        // an expert nobody owns sends its row nowhere
        let lost = Routing {
            top_k: 1,
            ids: vec![9],
            weights: vec![1.0],
        };
        assert!(
            split_rows(&lost, &owner, 2)
                .iter()
                .all(|s| s.rows.is_empty())
        );
    }

    use super::*;

    fn v2() -> ModelConfig {
        ModelConfig::from_json_str(r#"{"n_routed_experts": 160, "n_group": 8, "topk_group": 3, "num_experts_per_tok": 6, "topk_method": "group_limited_greedy"}"#).unwrap()
    }

    #[test]
    fn groups_and_contiguous() {
        let c = v2();
        let p = Placement::default_for(&c, 2).unwrap();
        assert_eq!(p.shards[0], (0..80).collect::<Vec<_>>());
        let p = Placement::default_for(&c, 7).unwrap();
        assert_eq!(
            p.shards.iter().map(|s| s.len()).collect::<Vec<_>>(),
            vec![23, 23, 23, 23, 23, 23, 22]
        );
        assert_eq!(p.shards[6], (138..160).collect::<Vec<_>>());
        p.check(&c).unwrap();
        assert!(Placement::build(&c, 3, PlacementKind::Groups).is_err());
        assert!(Placement::build(&c, 0, PlacementKind::Contiguous).is_err());
    }

    #[test]
    fn expert_lists() {
        assert_eq!(parse_expert_list("0-3,7").unwrap(), vec![0, 1, 2, 3, 7]);
        assert!(
            parse_expert_list("3-1")
                .unwrap_err()
                .to_string()
                .contains("3-1")
        );
        assert!(parse_expert_list("x").is_err());
    }

    #[test]
    fn file_must_cover_every_expert() {
        let c = v2();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.json");
        std::fs::write(&f, r#"{"shards": [[0, 1], [2]]}"#).unwrap();
        let err = Placement::from_file(&f, &c).unwrap_err().to_string();
        assert!(err.contains("expert 3 is not hosted"), "{err}");
    }

    #[test]
    fn replicated_chains_whole_shards() {
        let c = v2();
        let p = Placement::default_for(&c, 4)
            .unwrap()
            .replicated(2)
            .unwrap();
        assert_eq!(p.shards[0], (0..80).collect::<Vec<_>>());
        let last: Vec<usize> = (0..40).chain(120..160).collect();
        assert_eq!(p.shards[3], last);
        p.check(&c).unwrap();
        let sets = p.replica_sets(160);
        assert_eq!(sets.len(), 4);
        assert_eq!(sets[0].owners, vec![0, 1]);
        assert_eq!(sets[0].experts, (40..80).collect::<Vec<_>>());
        assert_eq!(sets[1].owners, vec![0, 3]);
        assert_eq!(sets[1].experts, (0..40).collect::<Vec<_>>());
        assert_eq!(sets[3].owners, vec![2, 3]);
        for s in &sets {
            assert_eq!(s.owners.len(), 2, "{s:?}");
        }
        let one = Placement::default_for(&c, 4).unwrap();
        assert_eq!(one.replicated(1).unwrap(), one);
        assert!(one.replicated(0).is_err());
        assert!(
            one.replicated(5)
                .unwrap_err()
                .to_string()
                .contains("--replicas 5")
        );
    }

    #[test]
    fn replica_sets_without_replicas_follow_the_shards() {
        let p = Placement {
            shards: vec![vec![2, 3], vec![0, 1], vec![4, 1]],
        };
        let sets = p.replica_sets(5);
        let got: Vec<(Vec<usize>, Vec<usize>)> =
            sets.into_iter().map(|s| (s.owners, s.experts)).collect();
        assert_eq!(
            got,
            vec![
                (vec![0], vec![2, 3]),
                (vec![1], vec![0]),
                (vec![1, 2], vec![1]),
                (vec![2], vec![4]),
            ]
        );
    }

    #[test]
    fn experts_on_several_shards_lists_replicas_once() {
        assert!(experts_on_several_shards(&[vec![0, 1], vec![2, 3]]).is_empty());
        // A shard listing an expert twice is not a replica.
        assert!(experts_on_several_shards(&[vec![0, 0, 1], vec![2]]).is_empty());
        assert_eq!(
            experts_on_several_shards(&[vec![0, 1, 5], vec![1, 2], vec![5, 1]]),
            vec![1, 5]
        );
        assert!(experts_on_several_shards(&[]).is_empty());
    }
}
