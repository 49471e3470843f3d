//! Data-parallel gradients: N ranks at batch b give the one-process gradient at batch N b.
#![allow(clippy::unwrap_used)] // test setup: a failed step should panic

use candle_core::{Device, Tensor, Var};
use clipcid_loss::ClipLoss;
use clipcid_train::{all_gather_rows, all_reduce_mean, Collective, InProcessGroup, SingleProcess};
use rand::{Rng, SeedableRng};

const B: usize = 3;
const D_IN: usize = 6;
const D: usize = 5;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// The CLIP loss of a two-tower linear model on `rows` of the global inputs, features
/// gathered over `c`, and the gradients of its three parameters (averaged over the ranks).
fn gradients(c: &dyn Collective, world: usize) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let n = world * B;
    let (ai, at) = (random(n * D_IN, 1), random(n * D_IN, 2));
    let wi =
        Var::from_tensor(&Tensor::from_vec(random(D_IN * D, 3), (D_IN, D), &dev).unwrap()).unwrap();
    let wt =
        Var::from_tensor(&Tensor::from_vec(random(D_IN * D, 4), (D_IN, D), &dev).unwrap()).unwrap();
    let scale = Var::from_tensor(&Tensor::new(&[2.3f32], &dev).unwrap()).unwrap();
    let rows = |a: &[f32]| {
        let per = n / c.world_size();
        let mine = &a[c.rank() * per * D_IN..(c.rank() + 1) * per * D_IN];
        Tensor::from_slice(mine, (per, D_IN), &dev).unwrap()
    };
    let img = rows(&ai).matmul(wi.as_tensor()).unwrap();
    let txt = rows(&at).matmul(wt.as_tensor()).unwrap();
    let (img, txt) = (
        all_gather_rows(c, &img).unwrap(),
        all_gather_rows(c, &txt).unwrap(),
    );
    assert_eq!(img.dims(), &[n, D]);
    let loss = ClipLoss::new()
        .forward(&img, &txt, scale.as_tensor())
        .unwrap();
    let mut grads = loss.backward().unwrap();
    all_reduce_mean(c, &mut grads, &[&wi, &wt, &scale]).unwrap();
    [&wi, &wt, &scale]
        .iter()
        .map(|v| {
            grads
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

#[test]
fn ranks_at_batch_b_get_the_one_process_gradient_at_batch_n_b() {
    for world in [2usize, 3] {
        let one = gradients(&SingleProcess, world);
        let ranks = InProcessGroup::new(world);
        let all: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|r| s.spawn(move || gradients(r, world)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, g) in all.iter().enumerate() {
            // Every rank holds the same gradient (the all-reduce sums in rank order) ...
            assert!(g == &all[0], "rank {r} differs from rank 0");
            // ... and it is the one-process gradient of the global batch, the logit scale's
            // (a parameter the loss uses directly) included.
            for (p, (a, b)) in g.iter().zip(&one).enumerate() {
                let worst = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs() / y.abs().max(1e-3))
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-5,
                    "world {world}, parameter {p}: relative error {worst}"
                );
            }
        }
        // Without the gradient scaling of the own slice the feature path would be 1/world of
        // it: the test above would fail, so it checks the rule and not just the plumbing.
        assert!(one[0].iter().any(|v| v.abs() > 1e-4));
    }
}

#[test]
fn ranks_over_tcp_get_the_same_gradient_as_threads() {
    for world in [2usize, 3] {
        let one = gradients(&SingleProcess, world);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let master = format!("127.0.0.1:{port}");
        let all: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|r| {
                    let master = master.clone();
                    s.spawn(move || {
                        let rank = clipcid_train::TcpRank::connect(r, world, &master).unwrap();
                        gradients(&rank, world)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for g in &all {
            assert!(g == &all[0]);
            for (a, b) in g.iter().zip(&one) {
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() <= 1e-5 * y.abs().max(1e-3), "{x} vs {y}");
                }
            }
        }
    }
    // A rank beyond the group, or a master nobody can bind, is an error naming it.
    let e = clipcid_train::TcpRank::connect(2, 2, "127.0.0.1:1")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("RANK 2") && e.contains("WORLD_SIZE 2"), "{e}");
    let e = clipcid_train::TcpRank::connect(0, 2, "256.0.0.1:1")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("rank 0 of 2") && e.contains("256.0.0.1:1"),
        "{e}"
    );
}

#[test]
fn a_rank_that_ends_early_is_an_error_for_the_others_not_a_hang() {
    // Rank 2 takes part in one round, then returns (as on an error) or panics; ranks 0 and 1
    // go on to a second round and must get an error naming rank 2.
    for panics in [false, true] {
        let results: Vec<Result<Vec<f32>, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = InProcessGroup::new(3)
                .into_iter()
                .map(|r| {
                    s.spawn(move || {
                        let mut v = vec![1.0f32];
                        r.all_reduce_sum(&mut v).map_err(|e| e.to_string())?;
                        if r.rank() == 2 {
                            assert!(!panics, "rank 2 panics");
                            return Ok(v);
                        }
                        r.all_reduce_sum(&mut v).map_err(|e| e.to_string())?;
                        Ok(v)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
                .collect()
        });
        assert_eq!(
            results[2],
            if panics {
                Err("panicked".into())
            } else {
                Ok(vec![3.0])
            }
        );
        for r in &results[..2] {
            let e = r.as_ref().unwrap_err();
            assert!(e.contains("rank 2"), "{e}");
        }
    }
}

/// A local address nothing listens on (the port was free a moment ago).
fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

#[test]
fn over_tcp_a_missing_or_departed_rank_is_an_error_naming_it() {
    // Ranks that never join: rank 0 gives up after the limit instead of waiting in accept.
    let limit = std::time::Duration::from_millis(300);
    let e = clipcid_train::TcpRank::connect_within(0, 3, &free_port(), limit)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("0 of the 2 other ranks"), "{e}");
    // Rank 2 leaves after one round (its streams close): rank 0 names it, rank 1 hears that
    // rank 0 ended the group, both from the closed streams rather than the (long) limit.
    let master = free_port();
    let limit = std::time::Duration::from_secs(120);
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|r| {
                let master = master.clone();
                s.spawn(move || {
                    let rank = clipcid_train::TcpRank::connect_within(r, 3, &master, limit)
                        .map_err(|e| e.to_string())?;
                    let mut v = vec![1.0f32];
                    rank.all_reduce_sum(&mut v).map_err(|e| e.to_string())?;
                    if r == 2 {
                        return Ok(());
                    }
                    rank.all_reduce_sum(&mut v).map_err(|e| e.to_string())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results[2], Ok(()));
    let e0 = results[0].as_ref().unwrap_err();
    assert!(e0.contains("rank 0 of 3: lost rank 2"), "{e0}");
    let e1 = results[1].as_ref().unwrap_err();
    assert!(e1.contains("rank 1 of 3: lost rank 0"), "{e1}");
    // Closed streams, not the read limit: end of file, never a timeout.
    for e in [e0, e1] {
        assert!(
            !e.contains("temporarily unavailable") && !e.contains("timed out"),
            "{e}"
        );
    }
}

/// A group of one posing as rank 0 of 3 whose peers hold the same values (so a sum is 3x),
/// counting its collective calls.
#[derive(Default)]
struct Tripled {
    calls: std::sync::atomic::AtomicUsize,
}

impl Collective for Tripled {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        3
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, clipcid_train::TrainError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(vec![local.to_vec(); 3])
    }
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), clipcid_train::TrainError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        data.iter_mut().for_each(|x| *x = *x + *x + *x);
        Ok(())
    }
}

#[test]
fn gradients_cross_the_ranks_in_one_call_and_each_value_is_divided() {
    let dev = Device::Cpu;
    let var = |shape: &[usize], seed| {
        let n = shape.iter().product();
        Var::from_tensor(&Tensor::from_vec(random(n, seed), shape, &dev).unwrap()).unwrap()
    };
    let (a, b, unused) = (var(&[3, 5], 7), var(&[4], 8), var(&[2, 2], 9));
    let k = Tensor::from_vec(random(15, 10), (3, 5), &dev).unwrap();
    let loss = ((a.as_tensor() * &k).unwrap().sum_all().unwrap()
        + b.as_tensor().sqr().unwrap().sum_all().unwrap())
    .unwrap();
    let mut grads = loss.backward().unwrap();
    let before: Vec<Vec<f32>> = [&a, &b]
        .iter()
        .map(|v| {
            let g = grads.get(v.as_tensor()).unwrap();
            g.flatten_all().unwrap().to_vec1().unwrap()
        })
        .collect();
    let group = Tripled::default();
    all_reduce_mean(&group, &mut grads, &[&a, &b, &unused]).unwrap();
    assert_eq!(group.calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    for (v, was) in [&a, &b].iter().zip(&before) {
        let g = grads.get(v.as_tensor()).unwrap();
        assert_eq!(g.dims(), v.as_tensor().dims());
        let got: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = was.iter().map(|x| (x + x + x) / 3.0).collect();
        assert_eq!(got, want, "bit for bit: (sum over ranks) / world");
    }
    // A variable without a gradient here takes part as zeros.
    let g = grads.get(unused.as_tensor()).unwrap();
    assert_eq!(g.dims(), &[2, 2]);
    assert_eq!(g.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [0.0; 4]);
}

#[test]
fn the_group_of_one_changes_nothing_and_own_rows_carry_world_times_the_gradient() {
    let dev = Device::Cpu;
    let one = SingleProcess;
    assert_eq!((one.rank(), one.world_size()), (0, 1));
    assert_eq!(one.all_gather(&[1.5, -2.0]).unwrap(), vec![vec![1.5, -2.0]]);
    let mut v = vec![1.5, -2.0];
    one.all_reduce_sum(&mut v).unwrap();
    assert_eq!(v, [1.5, -2.0]);
    let t = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev).unwrap();
    let summed = one.all_reduce_sum_tensor(&t).unwrap();
    assert_eq!(
        summed.to_vec2::<f32>().unwrap(),
        t.to_vec2::<f32>().unwrap()
    );

    // Rows gathered from `world` ranks: rank r holds the rows [r, r + 0.5]. The value is every
    // rank's rows in rank order; d(sum(w * rows))/d(own rows) is `world * w` on the own
    // slice (the others' rows are constants).
    for world in [1usize, 3] {
        let ranks = InProcessGroup::new(world);
        let run = |c: &dyn Collective| {
            let x = Var::from_tensor(
                &Tensor::new(&[[c.rank() as f32, c.rank() as f32 + 0.5]], &dev).unwrap(),
            )
            .unwrap();
            let all = all_gather_rows(c, x.as_tensor()).unwrap();
            let w = Tensor::arange(0f32, 2.0 * world as f32, &dev)
                .unwrap()
                .reshape((world, 2))
                .unwrap();
            let grads = (&all * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g = grads.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
            (all.to_vec2::<f32>().unwrap(), g)
        };
        let got: Vec<_> = if world == 1 {
            vec![run(&SingleProcess)]
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = ranks.iter().map(|r| s.spawn(move || run(r))).collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            })
        };
        let rows: Vec<Vec<f32>> = (0..world).map(|r| vec![r as f32, r as f32 + 0.5]).collect();
        for (r, (all, g)) in got.iter().enumerate() {
            assert_eq!(all, &rows, "world {world}, rank {r}");
            let w = world as f32;
            assert_eq!(
                g,
                &vec![vec![w * (2 * r) as f32, w * (2 * r + 1) as f32]],
                "world {world}, rank {r}"
            );
        }
    }
}

#[test]
fn no_variables_is_no_collective_call() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &dev).unwrap()).unwrap();
    let mut grads = x.as_tensor().sum_all().unwrap().backward().unwrap();
    let group = Tripled::default();
    all_reduce_mean(&group, &mut grads, &[]).unwrap();
    assert_eq!(group.calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    let g: Vec<f32> = grads.get(x.as_tensor()).unwrap().to_vec1().unwrap();
    assert_eq!(g, [1.0, 1.0]);
}

#[test]
fn over_tcp_a_rank_started_before_rank_0_waits_for_it_within_the_limit() {
    use clipcid_train::TcpRank;
    let limit = std::time::Duration::from_secs(60);
    // Rank 1 first: its connections are refused until rank 0 listens, and it retries.
    let master = free_port();
    let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
        let early = s.spawn(|| {
            let r = TcpRank::connect_within(1, 2, &master, limit).unwrap();
            let mut v = vec![2.0f32, 3.0];
            r.all_reduce_sum(&mut v).unwrap();
            v
        });
        std::thread::sleep(std::time::Duration::from_millis(400));
        let r = TcpRank::connect_within(0, 2, &master, limit).unwrap();
        let mut v = vec![10.0f32, 20.0];
        r.all_reduce_sum(&mut v).unwrap();
        vec![v, early.join().unwrap()]
    });
    assert_eq!(sums, vec![vec![12.0, 23.0]; 2]);
    // No rank 0 at all: rank 1 gives up after the limit, naming the address.
    let master = free_port();
    let limit = std::time::Duration::from_millis(300);
    let start = std::time::Instant::now();
    let e = TcpRank::connect_within(1, 2, &master, limit)
        .err()
        .unwrap()
        .to_string();
    assert!(
        start.elapsed() >= limit,
        "gave up after {:?}",
        start.elapsed()
    );
    assert!(
        e.contains("rank 1 of 2: cannot reach rank 0 at") && e.contains(&master),
        "{e}"
    );
}

#[test]
fn over_tcp_a_peer_announcing_an_impossible_length_is_an_error_not_an_allocation() {
    use std::io::Write;
    let master = free_port();
    let limit = std::time::Duration::from_secs(60);
    let e = std::thread::scope(|s| {
        let zero = s.spawn(|| {
            let r = clipcid_train::TcpRank::connect_within(0, 2, &master, limit).unwrap();
            r.all_gather(&[1.0]).err().unwrap().to_string()
        });
        // A peer that says it is rank 1, then announces 2^40 values (4 TiB).
        let mut peer = loop {
            match std::net::TcpStream::connect(&master) {
                Ok(p) => break p,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        };
        peer.write_all(&1u64.to_le_bytes()).unwrap();
        peer.write_all(&(1u64 << 40).to_le_bytes()).unwrap();
        let e = zero.join().unwrap();
        drop(peer);
        e
    });
    assert!(
        e.contains("rank 0 of 2: lost rank 1") && e.contains("announced 1099511627776 values"),
        "{e}"
    );
}
