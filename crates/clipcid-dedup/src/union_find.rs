//! Disjoint sets over `u32` ids.

/// Union-find (disjoint-set forest) over ids `0..n`, with path halving and union by size.
///
/// The partition it ends with depends only on the set of unions, not their order; use
/// [`UnionFind::canonical_labels`] for labels that are equal across runs.
///
/// ```
/// use clipcid_dedup::UnionFind;
/// let mut uf = UnionFind::new(5);
/// uf.union(0, 3);
/// uf.union(3, 4);
/// assert!(uf.same(0, 4));
/// assert!(!uf.same(0, 1));
/// assert_eq!(uf.canonical_labels(), vec![0, 1, 2, 0, 0]);
/// ```
#[derive(Debug, Clone)]
pub struct UnionFind {
    parent: Vec<u32>,
    size: Vec<u32>,
    sets: usize,
}

impl UnionFind {
    /// `n` singleton sets. Panics if `n` exceeds `u32::MAX` ids (4 billion images).
    pub fn new(n: usize) -> Self {
        assert!(
            n <= u32::MAX as usize,
            "UnionFind holds at most 2^32 - 1 ids"
        );
        Self {
            parent: (0..n as u32).collect(),
            size: vec![1; n],
            sets: n,
        }
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        self.parent.len()
    }

    /// True when there are no ids.
    pub fn is_empty(&self) -> bool {
        self.parent.is_empty()
    }

    /// Number of disjoint sets.
    pub fn num_sets(&self) -> usize {
        self.sets
    }

    /// Root of `x`'s set (compresses the path by halving).
    pub fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let gp = self.parent[self.parent[x as usize] as usize];
            self.parent[x as usize] = gp;
            x = gp;
        }
        x
    }

    /// Merges the sets of `a` and `b`; returns true if they were separate.
    pub fn union(&mut self, a: u32, b: u32) -> bool {
        let (mut ra, mut rb) = (self.find(a), self.find(b));
        if ra == rb {
            return false;
        }
        if self.size[ra as usize] < self.size[rb as usize] {
            std::mem::swap(&mut ra, &mut rb);
        }
        self.parent[rb as usize] = ra;
        self.size[ra as usize] += self.size[rb as usize];
        self.sets -= 1;
        true
    }

    /// Whether `a` and `b` are in the same set.
    pub fn same(&mut self, a: u32, b: u32) -> bool {
        self.find(a) == self.find(b)
    }

    /// For every id, the smallest id of its set: a labelling that does not depend on the
    /// order of unions.
    pub fn canonical_labels(&mut self) -> Vec<u32> {
        let n = self.len();
        let mut min_of_root = vec![u32::MAX; n];
        let roots: Vec<u32> = (0..n as u32).map(|i| self.find(i)).collect();
        for (i, &r) in roots.iter().enumerate() {
            let m = &mut min_of_root[r as usize];
            *m = (*m).min(i as u32);
        }
        roots.iter().map(|&r| min_of_root[r as usize]).collect()
    }
}
