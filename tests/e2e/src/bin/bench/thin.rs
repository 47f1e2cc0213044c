//! Section 6: a VM's root disk on the thin pool against the sparse copy, for a small and a
//! large image, measured inside the test-host guest (this host's kernel has no device-mapper):
//! the time `hearth start` takes to make the disk (QEMU replaced by `false`, so the start ends
//! right after the disk and config are made), median of the runs, on the same guest.

use hearth_e2e::test_host::{in_test_host, prelude, test_host_image};
use hearth_e2e::Daemon;

/// Prints the section's table.
pub fn thin_vs_copy(d: &Daemon, runs: usize) {
    println!("\n### VM root disk: thin snapshot against sparse copy ({runs} VMs per image, inside the test-host guest)\n");
    test_host_image(d, "benchhost:1", true);
    let script = format!(
        "{}\
         $H host provision --dev --root $R --data-size 8G --metadata-size 128M >/dev/null; \
         mkdir -p /big/bin; cp /bin/busybox /big/bin/; ln -s busybox /big/bin/sh; \
         dd if=/dev/urandom of=/big/payload.bin bs=1M count=1024 2>/dev/null; \
         tar -cf /big.tar -C /big . && rm -rf /big; \
         now() {{ cut -d' ' -f1 /proc/uptime; }}; \
         for mode in thin copy; do \
           if [ $mode = thin ]; then daemon --thin-pool hearth-thinpool; else daemon; fi; \
           [ $mode = thin ] && {{ import_kernel; $H image import /demo --name small:1 >/dev/null; \
             $H image import /big.tar --name big:1 >/dev/null; }}; \
           for img in small:1 big:1; do for i in $(seq {runs}); do \
             $H create --name $mode-${{img%:1}}-$i --network none --size 2G $img >/dev/null; \
             t0=$(now); $H start $mode-${{img%:1}}-$i >/dev/null 2>&1; t1=$(now); \
             echo ROW $mode $img $i $t0 $t1; done; done; \
           for v in $($H ps -a -q); do $H rm -f $v >/dev/null; done; kill $HD; sleep 1; \
         done",
        prelude()
    );
    let (out, code) = in_test_host(d, "benchhost:1", "2G", "10G", &script);
    if code != 0 {
        println!("| failed in the guest ({code}) | | | |\n\n```\n{out}\n```");
        return;
    }
    // (mode, image) -> seconds per run, in order.
    let mut times: std::collections::BTreeMap<(String, String), Vec<f64>> = Default::default();
    for l in out.lines().filter(|l| l.starts_with("ROW ")) {
        let w: Vec<&str> = l.split_whitespace().collect();
        if let [_, mode, img, _, t0, t1] = w[..] {
            let dt = t1.parse::<f64>().unwrap_or(0.0) - t0.parse::<f64>().unwrap_or(0.0);
            times.entry((mode.to_owned(), img.to_owned())).or_default().push(dt);
        }
    }
    let ms = |v: &[f64]| format!("{:.0} ms", v.get(v.len() / 2).copied().unwrap_or(0.0) * 1000.0);
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        ms(&v)
    };
    println!("| image | thin: first VM (base written) | thin: next VMs (snapshot) | sparse copy |");
    println!("|---|---|---|---|");
    for (img, label) in [("small:1", "busybox (~2 MiB)"), ("big:1", "busybox + 1 GiB")] {
        let thin = times.get(&("thin".into(), img.into())).cloned().unwrap_or_default();
        let copy = times.get(&("copy".into(), img.into())).cloned().unwrap_or_default();
        let first = thin.first().map(|t| format!("{:.0} ms", t * 1000.0)).unwrap_or_default();
        println!(
            "| {label} | {first} | {} | {} |",
            median(thin.get(1..).unwrap_or_default()),
            median(&copy)
        );
    }
}
