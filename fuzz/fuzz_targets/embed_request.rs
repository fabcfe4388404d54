//! Any bytes, decoded as an `EmbedRequest`, through the service's validation and conversion and
//! its tokenization: either a field-named INVALID_ARGUMENT or a well-formed plan (sizes allowed,
//! user vectors finite and of the asked size, token counts within the limit). Never a panic.
#![no_main]

mod fixture;

use libfuzzer_sys::fuzz_target;
use mlx_embed::error::Error;
use mlx_embed::grpc::convert::{prepare_embed, tokenize_texts, RequestLimits};
use mlx_embed::grpc::pb;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else { return };
    let Ok(req) = pb::EmbedRequest::decode(bytes) else { return };
    let f = &fixture::fixtures()[pick as usize % 2];
    let info = &f.pre.info;
    let limits = RequestLimits { max_items: 16, max_text_bytes: 2048 };
    let items = req.items.len();
    let plan = match prepare_embed(req, &f.pre, &f.cfg, &limits) {
        Ok(plan) => plan,
        Err(Error::InvalidArgument { field, .. }) => return assert!(!field.is_empty()),
        Err(other) => panic!("not an INVALID_ARGUMENT: {other:?}"),
    };
    assert!((1..=limits.max_items).contains(&items) && plan.out.len() == items);
    assert!(plan.dims >= 1 && plan.dims <= info.dimensions as usize);
    for e in plan.out.iter().flatten() {
        let values: Vec<f32> = match plan.encoding {
            pb::Encoding::Float => e.values.clone(),
            pb::Encoding::PackedF32Le => e.packed.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
        };
        assert_eq!(values.len(), plan.dims);
        assert!(values.iter().all(|v| v.is_finite()));
    }
    assert_eq!(plan.out.iter().filter(|o| o.is_none()).count(), plan.texts.len());
    let limit = f.cfg.max_tokens.unwrap_or(info.max_tokens).min(info.max_tokens);
    match tokenize_texts(&f.pre, &plan.prompt, &plan.texts, f.cfg.max_tokens, plan.truncation) {
        Ok(encoded) => {
            for e in encoded {
                assert!(!e.ids.is_empty() && e.ids.len() <= limit, "{} tokens, limit {limit}", e.ids.len());
            }
        }
        Err(Error::InvalidArgument { field, .. }) => assert!(field.starts_with("items[")),
        Err(other) => panic!("tokenization failed otherwise: {other:?}"),
    }
});
