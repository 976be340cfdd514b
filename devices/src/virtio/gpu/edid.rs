//! The EDID the GPU gives for its one display: a 128-byte EDID 1.4 base
//! block whose preferred (and only) mode is the configured one, so that the
//! guest's DRM driver picks exactly that mode.
//!
//! Timings use CVT reduced blanking figures (160 pixels of horizontal
//! blanking, 30 lines of vertical) at 60 Hz, lowered for large modes so
//! that the pixel clock fits the descriptor's 16 bits of 10 kHz.

/// Manufacturer id "SKF", five bits a letter ('A' = 1).
const MANUFACTURER: u16 =
    ((b'S' - b'@') as u16) << 10 | ((b'K' - b'@') as u16) << 5 | (b'F' - b'@') as u16;
const H_BLANK: u32 = 160;
const H_FRONT: u32 = 48;
const H_SYNC: u32 = 32;
const V_BLANK: u32 = 30;
const V_FRONT: u32 = 3;
const V_SYNC: u32 = 6;
/// Largest pixel clock a detailed timing holds, in 10 kHz.
const MAX_CLOCK: u64 = 0xffff;
/// Pixels per centimetre assumed for the physical size (96 dpi).
const PX_PER_CM: u32 = 38;

/// The EDID of a `width` x `height` display (each at most 4095).
pub(super) fn edid(width: u32, height: u32) -> Vec<u8> {
    let mut e = vec![0u8; 128];
    e[0..8].copy_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);
    e[8..10].copy_from_slice(&MANUFACTURER.to_be_bytes());
    e[10..12].copy_from_slice(&1u16.to_le_bytes());
    // Week unknown, model year 2026.
    e[16] = 0;
    e[17] = (2026 - 1990) as u8;
    e[18] = 1;
    e[19] = 4;
    // Digital input, 8 bits per colour.
    e[20] = 0x80 | 0x20;
    e[21] = (width / PX_PER_CM).clamp(1, 255) as u8;
    e[22] = (height / PX_PER_CM).clamp(1, 255) as u8;
    // Gamma 2.2.
    e[23] = 120;
    // sRGB, RGB 4:4:4, the preferred mode is native.
    e[24] = 0x06;
    // sRGB chromaticity.
    e[25..35].copy_from_slice(&[0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54]);
    // No established timings; standard timings unused.
    for i in 0..8 {
        e[38 + 2 * i] = 0x01;
        e[39 + 2 * i] = 0x01;
    }
    e[54..72].copy_from_slice(&detailed_timing(width, height));
    e[72..90].copy_from_slice(&text_descriptor(0xfc, "Skiff"));
    e[90..108].copy_from_slice(&text_descriptor(0xfe, "virtio-gpu"));
    // A dummy descriptor.
    e[111] = 0x10;
    let sum = e[..127].iter().fold(0u8, |a, &b| a.wrapping_add(b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

fn detailed_timing(width: u32, height: u32) -> [u8; 18] {
    let (w, h) = (width.min(4095), height.min(4095));
    let total = u64::from(w + H_BLANK) * u64::from(h + V_BLANK);
    // 60 Hz, or less where the clock would not fit.
    let refresh = (MAX_CLOCK * 10_000 / total).min(60);
    let clock = (total * refresh).div_ceil(10_000) as u16;
    let (hmm, vmm) = (w * 10 / PX_PER_CM, h * 10 / PX_PER_CM);
    let lo = |v: u32| (v & 0xff) as u8;
    let hi4 = |v: u32| ((v >> 8) & 0xf) as u8;
    let mut d = [0u8; 18];
    d[0..2].copy_from_slice(&clock.to_le_bytes());
    d[2] = lo(w);
    d[3] = lo(H_BLANK);
    d[4] = hi4(w) << 4 | hi4(H_BLANK);
    d[5] = lo(h);
    d[6] = lo(V_BLANK);
    d[7] = hi4(h) << 4 | hi4(V_BLANK);
    d[8] = lo(H_FRONT);
    d[9] = lo(H_SYNC);
    d[10] = ((V_FRONT & 0xf) << 4 | (V_SYNC & 0xf)) as u8;
    d[11] = (((H_FRONT >> 8) & 3) << 6
        | ((H_SYNC >> 8) & 3) << 4
        | ((V_FRONT >> 4) & 3) << 2
        | ((V_SYNC >> 4) & 3)) as u8;
    d[12] = lo(hmm);
    d[13] = lo(vmm);
    d[14] = hi4(hmm) << 4 | hi4(vmm);
    // Digital separate sync, both polarities positive.
    d[17] = 0x1e;
    d
}

/// A display descriptor of type `tag` holding `text` (at most 13 bytes,
/// ended by a newline and padded with spaces).
fn text_descriptor(tag: u8, text: &str) -> [u8; 18] {
    let mut d = [0u8; 18];
    d[3] = tag;
    let mut body = [b' '; 13];
    let t = &text.as_bytes()[..text.len().min(12)];
    body[..t.len()].copy_from_slice(t);
    body[t.len()] = b'\n';
    d[5..].copy_from_slice(&body);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads back the preferred mode as Linux's `drm_mode_detailed` does.
    fn mode(e: &[u8]) -> (u32, u32, u32) {
        let d = &e[54..72];
        let clock_khz = u32::from(u16::from_le_bytes([d[0], d[1]])) * 10;
        let w = u32::from(d[2]) | u32::from(d[4] >> 4) << 8;
        let hb = u32::from(d[3]) | u32::from(d[4] & 0xf) << 8;
        let h = u32::from(d[5]) | u32::from(d[7] >> 4) << 8;
        let vb = u32::from(d[6]) | u32::from(d[7] & 0xf) << 8;
        let refresh = clock_khz * 1000 / ((w + hb) * (h + vb));
        (w, h, refresh)
    }

    #[test]
    fn the_preferred_mode_is_the_configured_one() {
        for (w, h, hz) in [
            (1024, 768, 60),
            (1280, 800, 60),
            (320, 200, 60),
            (3840, 2160, 59),
        ] {
            let e = edid(w, h);
            assert_eq!(e.len(), 128);
            assert_eq!(&e[0..8], &[0, 255, 255, 255, 255, 255, 255, 0]);
            assert_eq!(e.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0, "checksum");
            let (mw, mh, refresh) = mode(&e);
            assert_eq!((mw, mh), (w, h));
            assert!((hz..=60).contains(&refresh), "{w}x{h}: {refresh} Hz");
            // EDID 1.4, no extension blocks.
            assert_eq!((e[18], e[19], e[126]), (1, 4, 0));
        }
        // The largest mode still gets a clock that fits (a lower refresh).
        let (w, h, refresh) = mode(&edid(4095, 4095));
        assert_eq!((w, h), (4095, 4095));
        assert!((30..60).contains(&refresh), "{refresh}");
    }

    #[test]
    fn names_the_monitor() {
        let e = edid(1024, 768);
        assert_eq!(&e[72..77], &[0, 0, 0, 0xfc, 0]);
        assert_eq!(&e[77..83], b"Skiff\n");
        assert_eq!(&e[8..10], &[0x4d, 0x66]);
    }
}
