//! A bounded slab with generational handles: the tags the resync machines hand out for
//! local IO. A handle is the slot index in the low 32 bits and the slot's generation in the
//! high 32, so a stale or forged tag is recognised instead of hitting a reused slot.

#[derive(Debug, Clone)]
pub(crate) struct Slab<T> {
    entries: Vec<(u32, Option<T>)>,
    free: Vec<u32>,
    len: usize,
    cap: usize,
}

impl<T> Slab<T> {
    /// At most `cap` live entries (slots are allocated as needed, up to `cap`).
    pub(crate) fn new(cap: usize) -> Self {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
            cap: cap.min(u32::MAX as usize),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_full(&self) -> bool {
        self.len >= self.cap
    }

    /// Stores `v`; `None` when full.
    pub(crate) fn insert(&mut self, v: T) -> Option<u64> {
        if self.is_full() {
            return None;
        }
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.entries.push((0, None));
                u32::try_from(self.entries.len() - 1).ok()?
            }
        };
        let e = self.entries.get_mut(idx as usize)?;
        e.0 = e.0.wrapping_add(1);
        e.1 = Some(v);
        self.len += 1;
        Some((u64::from(e.0) << 32) | u64::from(idx))
    }

    fn slot(h: u64) -> (usize, u32) {
        ((h & 0xffff_ffff) as usize, (h >> 32) as u32)
    }

    pub(crate) fn get(&self, h: u64) -> Option<&T> {
        let (i, gen) = Self::slot(h);
        match self.entries.get(i) {
            Some((g, Some(v))) if *g == gen => Some(v),
            _ => None,
        }
    }

    pub(crate) fn get_mut(&mut self, h: u64) -> Option<&mut T> {
        let (i, gen) = Self::slot(h);
        match self.entries.get_mut(i) {
            Some((g, Some(v))) if *g == gen => Some(v),
            _ => None,
        }
    }

    pub(crate) fn remove(&mut self, h: u64) -> Option<T> {
        let (i, gen) = Self::slot(h);
        match self.entries.get_mut(i) {
            Some((g, v @ Some(_))) if *g == gen => {
                self.len -= 1;
                self.free.push(u32::try_from(i).ok()?);
                v.take()
            }
            _ => None,
        }
    }

    /// Live entries with their handles.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.entries.iter().enumerate().filter_map(|(i, (g, v))| {
            v.as_ref()
                .map(|v| ((u64::from(*g) << 32) | (i as u64 & 0xffff_ffff), v))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_and_forged_handles_miss() {
        let mut s = Slab::new(2);
        let a = s.insert(1).expect("room");
        let b = s.insert(2).expect("room");
        assert!(s.insert(3).is_none());
        assert_eq!(s.remove(a), Some(1));
        assert_eq!(s.remove(a), None);
        let c = s.insert(4).expect("room");
        assert_ne!(a, c);
        assert_eq!(s.get(a), None);
        assert_eq!(s.get(c), Some(&4));
        assert_eq!(s.get(u64::MAX), None);
        *s.get_mut(b).expect("live") = 5;
        let mut all: Vec<_> = s.iter().map(|(_, v)| *v).collect();
        all.sort();
        assert_eq!(all, vec![4, 5]);
        assert_eq!(s.len(), 2);
    }
}
