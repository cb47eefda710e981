#!/usr/bin/env bash
# Rebuild the datasets data/{food-reviews,wordnet-supersense,fortunes,austen}
# from Debian packages (see data/README.md).
#
#   bash scripts/prepare_data.sh            # writes into data/
#   OUT=/some/dir bash scripts/prepare_data.sh
#
# Needs: apt-get (with bookworm package lists), dpkg, Rscript (r-base-core),
# python3.  Nothing is installed: the .deb files are downloaded and unpacked
# into a temporary directory that is removed afterwards.  The output is
# deterministic: rerunning produces byte-identical files.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/data}"

# Pinned versions (Debian 12 "bookworm").
PACKAGES=(
  "r-cran-modeldata=1.1.0-1"
  "wordnet-base=1:3.0-37"
  "fortunes=1:1.99.1-7.3"
  "fortunes-min=1:1.99.1-7.3"
  "r-cran-janeaustenr=1.0.0-1"
)
DATASETS=(food-reviews wordnet-supersense fortunes austen)

die() { echo "prepare_data: $*" >&2; exit 1; }

for tool in apt-get dpkg dpkg-deb Rscript python3; do
  command -v "$tool" >/dev/null 2>&1 || die "missing tool: $tool"
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/prepare_data.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/debs" "$WORK/root" "$WORK/r"
# apt-get download drops privileges to the _apt user when run as root.
chmod 0755 "$WORK"
chmod 0777 "$WORK/debs"

echo "Downloading: ${PACKAGES[*]}"
if ! (cd "$WORK/debs" && apt-get download -q "${PACKAGES[@]}"); then
  die "apt-get download failed (run 'apt-get update' first?)"
fi

echo "Debian packages used:"
VERSIONS=""
for spec in "${PACKAGES[@]}"; do
  name="${spec%%=*}"
  want="${spec#*=}"
  debs=("$WORK/debs/${name}_"*.deb)
  [ "${#debs[@]}" -eq 1 ] && [ -f "${debs[0]}" ] || die "no .deb for $name"
  deb="${debs[0]}"
  got="$(dpkg-deb -f "$deb" Version)"
  [ "$got" = "$want" ] || die "$name: got version $got, expected $want"
  printf '  %-20s %s\n' "$name" "$got"
  mkdir -p "$WORK/root/$name"
  dpkg -x "$deb" "$WORK/root/$name"
  VERSIONS="${VERSIONS:+$VERSIONS,}$name=$got"
done

# Export the R data sets to CSV, using only the unpacked packages.
cat >"$WORK/export.R" <<'REOF'
args <- commandArgs(trailingOnly = TRUE)
out <- args[1]
unpacked <- args[2]
for (p in c("modeldata", "janeaustenr")) {
  path <- normalizePath(find.package(p))
  if (!startsWith(path, normalizePath(unpacked)))
    stop("package ", p, " not loaded from the unpacked tree: ", path)
}
write_utf8 <- function(df, file) {
  stopifnot(!anyNA(df))
  write.csv(df, file, row.names = FALSE, fileEncoding = "UTF-8")
}
e <- new.env()
data(list = "small_fine_foods", package = "modeldata", envir = e)
for (nm in c("training_data", "testing_data")) {
  d <- get(nm, envir = e)
  write_utf8(data.frame(review = enc2utf8(as.character(d$review)),
                        score = as.character(d$score),
                        stringsAsFactors = FALSE),
             file.path(out, paste0(nm, ".csv")))
}
a <- janeaustenr::austen_books()
write_utf8(data.frame(text = enc2utf8(as.character(a$text)),
                      book = as.character(a$book),
                      stringsAsFactors = FALSE),
           file.path(out, "austen_books.csv"))
cat("R", as.character(getRversion()),
    "modeldata", as.character(packageVersion("modeldata")),
    "janeaustenr", as.character(packageVersion("janeaustenr")), "\n")
REOF

RLIB_MD="$WORK/root/r-cran-modeldata/usr/lib/R/site-library"
RLIB_JA="$WORK/root/r-cran-janeaustenr/usr/lib/R/site-library"
LC_ALL=C.UTF-8 R_LIBS="$RLIB_MD:$RLIB_JA" \
  Rscript --vanilla "$WORK/export.R" "$WORK/r" "$WORK/root"

mkdir -p "$OUT"
for d in "${DATASETS[@]}"; do
  rm -rf "${OUT:?}/$d"
done
LC_ALL=C.UTF-8 PYTHONHASHSEED=0 python3 "$ROOT/scripts/prepare_data.py" \
  --debroot "$WORK/root" --rexport "$WORK/r" \
  --versions "$VERSIONS" --out "$OUT"

echo "Wrote: $OUT/README.md and $OUT/{$(IFS=,; echo "${DATASETS[*]}")}/"
