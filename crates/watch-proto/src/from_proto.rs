//! etcd wire messages to watch-core values. Fallible: the wire allows values the core model
//! does not (negative revisions, unknown enum numbers, unset fields), each reported as a
//! [`ConvertError`].

use watch_core::{Event, EventKind, KeySelector, KeyValue, Revision, WatchOptions};

use crate::error::ConvertError;
use crate::etcdserverpb::watch_create_request::FilterType;
use crate::etcdserverpb::watch_request::RequestUnion;
use crate::etcdserverpb::{WatchCreateRequest, WatchRequest};
use crate::mvccpb;
use crate::mvccpb::event::EventType;

/// A non-negative wire `int64` (a revision or a version) as a core `u64`.
pub fn non_negative(field: &'static str, value: i64) -> Result<Revision, ConvertError> {
    u64::try_from(value).map_err(|_| ConvertError::NegativeField { field, value })
}

/// `mvccpb.KeyValue` as a core key-value. Fails on a negative revision or version.
pub fn key_value(kv: &mvccpb::KeyValue) -> Result<KeyValue, ConvertError> {
    Ok(KeyValue {
        key: kv.key.clone(),
        value: kv.value.clone(),
        create_revision: non_negative("create_revision", kv.create_revision)?,
        mod_revision: non_negative("mod_revision", kv.mod_revision)?,
        version: non_negative("version", kv.version)?,
        lease: kv.lease,
    })
}

impl TryFrom<&mvccpb::KeyValue> for KeyValue {
    type Error = ConvertError;
    fn try_from(kv: &mvccpb::KeyValue) -> Result<Self, Self::Error> {
        key_value(kv)
    }
}

impl TryFrom<mvccpb::KeyValue> for KeyValue {
    type Error = ConvertError;
    fn try_from(kv: mvccpb::KeyValue) -> Result<Self, Self::Error> {
        key_value(&kv)
    }
}

/// The core event kind of a wire event type number.
pub fn event_kind(value: i32) -> Result<EventKind, ConvertError> {
    match EventType::try_from(value) {
        Ok(EventType::Put) => Ok(EventKind::Put),
        Ok(EventType::Delete) => Ok(EventKind::Delete),
        Err(_) => Err(ConvertError::UnknownEnumValue {
            field: "type",
            value,
        }),
    }
}

/// `mvccpb.Event` as a core event. `kv` must be set. A DELETE keeps only the key and
/// `mod_revision` of its kv, the shape [`Event::delete`] builds, so a round trip through the
/// wire gives back the same core event.
pub fn event(ev: &mvccpb::Event) -> Result<Event, ConvertError> {
    let kind = event_kind(ev.r#type)?;
    let kv = ev
        .kv
        .as_ref()
        .ok_or(ConvertError::MissingField { field: "kv" })?;
    let kv = key_value(kv)?;
    let prev_kv = ev.prev_kv.as_ref().map(key_value).transpose()?;
    Ok(match kind {
        EventKind::Put => Event::put(kv, prev_kv),
        EventKind::Delete => Event::delete(kv.key, kv.mod_revision, prev_kv),
    })
}

impl TryFrom<&mvccpb::Event> for Event {
    type Error = ConvertError;
    fn try_from(ev: &mvccpb::Event) -> Result<Self, Self::Error> {
        event(ev)
    }
}

impl TryFrom<mvccpb::Event> for Event {
    type Error = ConvertError;
    fn try_from(ev: mvccpb::Event) -> Result<Self, Self::Error> {
        event(&ev)
    }
}

/// The watched keys and the watcher options of a `WatchCreateRequest`.
///
/// - An empty `key` is read as `"\0"`, the smallest key, as etcd's server rewrites it: with an
///   empty `range_end` that watches the single key `"\0"`; with `range_end = "\0"` every key.
/// - `(key, range_end)` then follows [`KeySelector::from_etcd_range`]; a range that selects no
///   key is [`ConvertError::InvalidSelector`].
/// - A negative `start_revision` is [`ConvertError::NegativeStartRevision`]; 0 means "now".
/// - Each `filters` entry must be `NOPUT` or `NODELETE`; an unknown number is
///   [`ConvertError::UnknownEnumValue`] (etcd ignores it, which would deliver events the
///   client asked to drop).
///
/// `watch_id`, `fragment` and `initial_state` concern the stream, not the watcher: see
/// [`watch_request`].
/// `buffer` is left at its default; the server sets it from its configuration.
pub fn watch_create(req: &WatchCreateRequest) -> Result<(KeySelector, WatchOptions), ConvertError> {
    let key: &[u8] = if req.key.is_empty() { b"\0" } else { &req.key };
    let selector = KeySelector::from_etcd_range(key, &req.range_end)?;
    let start_revision =
        u64::try_from(req.start_revision).map_err(|_| ConvertError::NegativeStartRevision {
            start_revision: req.start_revision,
        })?;
    let mut options = WatchOptions::default()
        .start_revision(start_revision)
        .progress_notify(req.progress_notify)
        .prev_kv(req.prev_kv);
    for &value in &req.filters {
        options = match FilterType::try_from(value) {
            Ok(FilterType::Noput) => options.no_put(true),
            Ok(FilterType::Nodelete) => options.no_delete(true),
            Err(_) => {
                return Err(ConvertError::UnknownEnumValue {
                    field: "filters",
                    value,
                });
            }
        };
    }
    Ok((selector, options))
}

/// A decoded `WatchCreateRequest`: the watcher plus the stream-level fields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WatchCreate {
    /// The watched keys.
    pub selector: KeySelector,
    /// The watcher options.
    pub options: WatchOptions,
    /// The client-chosen watch ID; 0 asks the server to assign one.
    pub watch_id: i64,
    /// The client accepts one revision split over several responses.
    pub fragment: bool,
    /// keywatch's extension field 100: list and watch in one call (the state at R, a marker,
    /// then the changes after R).
    pub initial_state: bool,
}

/// What a client asked for in one `WatchRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WatchCommand {
    /// Start a watch.
    Create(WatchCreate),
    /// Stop the watch with this ID.
    Cancel {
        /// The watch to stop.
        watch_id: i64,
    },
    /// Send a progress notification for the stream.
    Progress,
}

/// A `WatchRequest` as a [`WatchCommand`]. An unset `request_union` (also what a request type
/// newer than this proto decodes to) is [`ConvertError::MissingField`]; the create errors are
/// those of [`watch_create`].
pub fn watch_request(req: &WatchRequest) -> Result<WatchCommand, ConvertError> {
    match &req.request_union {
        Some(RequestUnion::CreateRequest(create)) => {
            let (selector, options) = watch_create(create)?;
            Ok(WatchCommand::Create(WatchCreate {
                selector,
                options,
                watch_id: create.watch_id,
                fragment: create.fragment,
                initial_state: create.initial_state,
            }))
        }
        Some(RequestUnion::CancelRequest(cancel)) => Ok(WatchCommand::Cancel {
            watch_id: cancel.watch_id,
        }),
        Some(RequestUnion::ProgressRequest(_)) => Ok(WatchCommand::Progress),
        None => Err(ConvertError::MissingField {
            field: "request_union",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcdserverpb::{WatchCancelRequest, WatchProgressRequest};
    use watch_core::WatchError;

    fn create(key: &'static [u8], range_end: &'static [u8]) -> WatchCreateRequest {
        WatchCreateRequest {
            key: key.into(),
            range_end: range_end.into(),
            ..Default::default()
        }
    }

    #[test]
    fn negative_fields() {
        for (field, wire) in [
            (
                "create_revision",
                mvccpb::KeyValue {
                    create_revision: -1,
                    ..Default::default()
                },
            ),
            (
                "mod_revision",
                mvccpb::KeyValue {
                    mod_revision: -2,
                    ..Default::default()
                },
            ),
            (
                "version",
                mvccpb::KeyValue {
                    version: -3,
                    ..Default::default()
                },
            ),
        ] {
            match key_value(&wire) {
                Err(ConvertError::NegativeField { field: f, value }) => {
                    assert_eq!(f, field);
                    assert!(value < 0);
                }
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn event_errors() {
        let no_kv = mvccpb::Event::default();
        assert_eq!(
            event(&no_kv),
            Err(ConvertError::MissingField { field: "kv" })
        );
        let bad_type = mvccpb::Event {
            r#type: 7,
            kv: Some(mvccpb::KeyValue::default()),
            prev_kv: None,
        };
        assert_eq!(
            event(&bad_type),
            Err(ConvertError::UnknownEnumValue {
                field: "type",
                value: 7
            })
        );
        let bad_prev = mvccpb::Event {
            r#type: EventType::Put as i32,
            kv: Some(mvccpb::KeyValue::default()),
            prev_kv: Some(mvccpb::KeyValue {
                mod_revision: -1,
                ..Default::default()
            }),
        };
        assert_eq!(
            Event::try_from(bad_prev),
            Err(ConvertError::NegativeField {
                field: "mod_revision",
                value: -1
            })
        );
    }

    #[test]
    fn create_selectors() {
        let sel = |k, e| watch_create(&create(k, e)).map(|(s, _)| s);
        assert_eq!(sel(b"k", b""), Ok(KeySelector::key("k")));
        assert_eq!(sel(b"foo", b"fop"), Ok(KeySelector::prefix("foo")));
        assert_eq!(sel(b"foo", b"\0"), Ok(KeySelector::from_key("foo")));
        assert_eq!(sel(b"a", b"c"), Ok(KeySelector::range("a", "c")));
        // etcd rewrites an empty key to "\0": alone it watches the single key "\0" ...
        assert_eq!(sel(b"", b""), Ok(KeySelector::key(&b"\0"[..])));
        // ... and with range_end "\0" every key.
        assert_eq!(sel(b"", b"\0"), Ok(KeySelector::All));
        assert_eq!(sel(b"\0", b"\0"), Ok(KeySelector::All));
        assert_eq!(
            sel(b"b", b"a"),
            Err(ConvertError::InvalidSelector(WatchError::EmptyRange {
                start: "b".into(),
                end: "a".into()
            }))
        );
    }

    #[test]
    fn create_options() {
        let req = WatchCreateRequest {
            start_revision: 12,
            progress_notify: true,
            prev_kv: true,
            filters: vec![FilterType::Noput as i32, FilterType::Nodelete as i32],
            ..create(b"k", b"")
        };
        let (_, opts) = watch_create(&req).unwrap();
        let want = WatchOptions::default()
            .start_revision(12)
            .progress_notify(true)
            .prev_kv(true)
            .no_put(true)
            .no_delete(true);
        assert_eq!(opts, want);
        let (_, defaults) = watch_create(&create(b"k", b"")).unwrap();
        assert_eq!(defaults, WatchOptions::default());
    }

    #[test]
    fn create_errors() {
        let negative = WatchCreateRequest {
            start_revision: -5,
            ..create(b"k", b"")
        };
        assert_eq!(
            watch_create(&negative),
            Err(ConvertError::NegativeStartRevision { start_revision: -5 })
        );
        let unknown_filter = WatchCreateRequest {
            filters: vec![0, 2],
            ..create(b"k", b"")
        };
        assert_eq!(
            watch_create(&unknown_filter),
            Err(ConvertError::UnknownEnumValue {
                field: "filters",
                value: 2
            })
        );
    }

    #[test]
    fn requests() {
        let create_req = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                watch_id: 4,
                fragment: true,
                initial_state: true,
                ..create(b"k", b"")
            })),
        };
        assert_eq!(
            watch_request(&create_req),
            Ok(WatchCommand::Create(WatchCreate {
                selector: KeySelector::key("k"),
                options: WatchOptions::default(),
                watch_id: 4,
                fragment: true,
                initial_state: true,
            }))
        );
        let cancel = WatchRequest {
            request_union: Some(RequestUnion::CancelRequest(WatchCancelRequest {
                watch_id: 9,
            })),
        };
        assert_eq!(
            watch_request(&cancel),
            Ok(WatchCommand::Cancel { watch_id: 9 })
        );
        let progress = WatchRequest {
            request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
        };
        assert_eq!(watch_request(&progress), Ok(WatchCommand::Progress));
        assert_eq!(
            watch_request(&WatchRequest::default()),
            Err(ConvertError::MissingField {
                field: "request_union"
            })
        );
    }
}
