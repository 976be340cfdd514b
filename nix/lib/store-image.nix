# A read-only store image: the closure of `roots`, store paths at the
# image's root (so it mounts as the lower layer of /nix/store), as an erofs
# file system in $out/store.erofs, with the paths listed in
# $out/store-paths. Built as nixpkgs' useNixStoreImage builds its image, but
# at build time, once per node configuration, not at every VM start.
#
# The tools default to the host's (Debian: erofs-utils, coreutils), so it
# builds with builtins only and the sandbox off; the guest module passes
# nixpkgs' instead.
{ system }:
{ name ? "nix-store-image"
, roots
, sh ? "/bin/sh"
, mkfsErofs ? "/usr/bin/mkfs.erofs"
, cp ? "/bin/cp"
, mkdir ? "/bin/mkdir"
  # The image's UUID: /dev/disk/by-uuid finds it (Debian's erofs-utils 1.5
  # cannot write a label).
, uuid ? "eb176051-bd15-49b7-9e6b-462e0b467019"
}:
derivation {
  inherit name system mkfsErofs cp mkdir uuid;
  builder = sh;
  # graph<i>: the closure of root i, as `path, deriver, count, references`.
  exportReferencesGraph = builtins.concatLists
    (builtins.genList (i: [ "graph${toString i}" (builtins.elemAt roots i) ]) (builtins.length roots));
  args = [
    "-c"
    ''
      set -e
      "$mkdir" -p "$out" staging
      : > "$out/store-paths"
      seen=" "
      for g in graph*; do
        while IFS= read -r path; do
          IFS= read -r deriver
          IFS= read -r count
          i=0
          while [ "$i" -lt "$count" ]; do IFS= read -r ref; i=$((i + 1)); done
          case "$seen" in *" $path "*) continue ;; esac
          seen="$seen$path "
          "$cp" -a "$path" staging/
          printf '%s\n' "$path" >> "$out/store-paths"
        done < "$g"
      done
      "$mkfsErofs" -T0 --all-root -U "$uuid" "$out/store.erofs" staging
    ''
  ];
}
