"""The download stage's data layer: read any file layout (read), map a record format onto chat messages
(normalize), fetch each source (sources), and mix, weight and split them into data/raw (mix)."""
