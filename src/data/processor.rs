//! Prompt expansion of the Idefics3 / SmolVLM processor: each `<image>` placeholder becomes the token
//! string of its image's tiles (rows x cols, each `image_seq_len` image tokens) plus the global image.

use crate::error::{DataError, Result};

/// The special strings used in expanded prompts (the processor's attributes).
#[derive(Debug, Clone)]
pub struct ImageTokens {
    /// `<image>`
    pub image: String,
    /// `<fake_token_around_image>`
    pub fake_around: String,
    /// `<global-img>`
    pub global: String,
}

impl Default for ImageTokens {
    fn default() -> Self {
        ImageTokens {
            image: "<image>".into(),
            fake_around: "<fake_token_around_image>".into(),
            global: "<global-img>".into(),
        }
    }
}

impl ImageTokens {
    /// The replacement of one placeholder for an image split into `rows` x `cols` tiles
    /// (0 x 0 = not split: only the global image).
    pub fn image_string(&self, rows: usize, cols: usize, image_seq_len: usize) -> String {
        let run = self.image.repeat(image_seq_len);
        let mut s = String::new();
        if rows == 0 && cols == 0 {
            s.push_str(&self.fake_around);
            s.push_str(&self.global);
            s.push_str(&run);
            s.push_str(&self.fake_around);
            return s;
        }
        for r in 0..rows {
            for c in 0..cols {
                s.push_str(&self.fake_around);
                s.push_str(&format!("<row_{}_col_{}>", r + 1, c + 1));
                s.push_str(&run);
            }
            s.push('\n');
        }
        s.push('\n');
        s.push_str(&self.fake_around);
        s.push_str(&self.global);
        s.push_str(&run);
        s.push_str(&self.fake_around);
        s
    }

    /// Number of `<image>` placeholders in `text`.
    pub fn count(&self, text: &str) -> usize {
        if self.image.is_empty() {
            0
        } else {
            text.matches(self.image.as_str()).count()
        }
    }

    /// Expands every placeholder of each sample with its image's (rows, cols), in order.
    /// `grids[i]` lists the images of sample i; counts must match the placeholders.
    pub fn expand_batch(
        &self,
        texts: &[String],
        grids: &[Vec<(usize, usize)>],
        image_seq_len: usize,
    ) -> Result<Vec<String>> {
        if texts.len() != grids.len() {
            return Err(
                DataError::Invalid(format!("{} prompts but images for {} samples", texts.len(), grids.len())).into()
            );
        }
        let counts: Vec<usize> = texts.iter().map(|t| self.count(t)).collect();
        let given: Vec<usize> = grids.iter().map(Vec::len).collect();
        if counts != given {
            let bad = counts.iter().zip(&given).position(|(a, b)| a != b).unwrap_or(0);
            return Err(DataError::Invalid(format!(
                "sample {bad}: {} {} placeholder(s) in the text but {} image(s); found {counts:?} placeholders and {given:?} images per sample",
                counts[bad], self.image, given[bad]
            ))
            .into());
        }
        Ok(texts
            .iter()
            .zip(grids)
            .map(|(text, imgs)| {
                let mut out = String::with_capacity(text.len() + imgs.len() * image_seq_len * self.image.len() * 2);
                let mut parts = text.split(self.image.as_str());
                if let Some(first) = parts.next() {
                    out.push_str(first);
                }
                for (part, &(r, c)) in parts.zip(imgs) {
                    out.push_str(&self.image_string(r, c, image_seq_len));
                    out.push_str(part);
                }
                out
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsplit_and_split_layouts() {
        let t = ImageTokens::default();
        assert_eq!(
            t.image_string(0, 0, 2),
            "<fake_token_around_image><global-img><image><image><fake_token_around_image>"
        );
        let s = t.image_string(1, 2, 1);
        assert_eq!(
            s,
            "<fake_token_around_image><row_1_col_1><image><fake_token_around_image><row_1_col_2><image>\n\n<fake_token_around_image><global-img><image><fake_token_around_image>"
        );
    }

    #[test]
    fn expansion_in_order_and_count_errors_name_the_sample() {
        let t = ImageTokens::default();
        let out =
            t.expand_batch(&["a<image>b<image>c".into(), "plain".into()], &[vec![(0, 0), (1, 1)], vec![]], 1).unwrap();
        assert!(out[0].starts_with("a<fake_token_around_image><global-img><image><fake_token_around_image>b<fake_token_around_image><row_1_col_1>"));
        assert_eq!(out[1], "plain");
        let e = t.expand_batch(&["x".into(), "<image>".into()], &[vec![], vec![]], 1).unwrap_err().to_string();
        assert!(e.contains("sample 1") && e.contains("0 image(s)"), "{e}");
    }
}
