# Text files in the store with nothing but /bin/sh: the text reaches the
# builder through passAsFile and is copied with the shell's own read and
# printf, so quotes, backslashes and `$` stay as they are and a reference
# to another store path inside the text (a kernel's path in a test
# description) becomes a dependency, which builtins.toFile cannot hold.
{ system }:
{
  writeText = name: text:
    derivation {
      inherit name system text;
      builder = "/bin/sh";
      passAsFile = [ "text" ];
      args = [
        "-c"
        ''
          while IFS= read -r line || [ -n "$line" ]; do
            printf '%s\n' "$line"
          done < "$textPath" > "$out"
        ''
      ];
    };
}
