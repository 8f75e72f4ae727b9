-- Split by group (issue #10): photos of one product shot in one run are near-identical, and a
-- per-image split put neighbours of a training photo into test. Every original now belongs to
-- a group of its SKU: the manifest's `group` for the image ('manifest:<group>'), else its
-- near-duplicate cluster by perceptual hash ('phash:<sha256 of the cluster's first image>'),
-- else the image alone ('image:<sha256>'). The split is decided per group, once, and a group
-- never straddles train/val/test: a later image that joins a group gets the group's split.
-- Written by sku_retraining/catalogue/registration.py (grouping.py) and variants.py
-- (a variant carries its source's group and split).

-- 64-bit DCT perceptual hash (imagehash.phash, signed) of the original, upright; computed once
-- at registration (image_check.py). NULL for variants and for rows registered before this.
ALTER TABLE images ADD COLUMN phash bigint;
ALTER TABLE images ADD COLUMN group_key text COLLATE "C";

-- Groups per SKU, kept by registration next to n_originals / n_val / n_test: a SKU with at
-- least split.min_originals_for_holdout groups gets a val and a test group.
ALTER TABLE skus ADD COLUMN n_groups integer NOT NULL DEFAULT 0;

-- Rows registered before groups existed were split one image at a time: each is its own group
-- (their split never changes). Variants carry their source's group.
UPDATE images SET group_key = 'image:' || sha256 WHERE source_sha256 IS NULL;
UPDATE images v SET group_key = o.group_key
FROM images o WHERE o.sha256 = v.source_sha256 AND v.source_sha256 IS NOT NULL;
UPDATE skus SET n_groups = n_originals;

ALTER TABLE images ALTER COLUMN group_key SET NOT NULL;
