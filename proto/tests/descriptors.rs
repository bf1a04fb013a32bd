//! Checks the compiled descriptor set: both services and their methods are there, every
//! message, field, enum value, service and method carries a doc comment, enum zero values are
//! `*_UNSPECIFIED`, and tonic-reflection accepts the set.

use prost::Message;
use prost_types::{FileDescriptorProto, FileDescriptorSet};

fn descriptor_set() -> FileDescriptorSet {
    FileDescriptorSet::decode(dsv2_proto::FILE_DESCRIPTOR_SET).expect("descriptor set decodes")
}

fn file<'a>(set: &'a FileDescriptorSet, name: &str) -> &'a FileDescriptorProto {
    set.file
        .iter()
        .find(|f| f.name() == name)
        .unwrap_or_else(|| panic!("{name} missing from descriptor set"))
}

/// Leading comment of the element at `path` (descriptor.proto's SourceCodeInfo paths).
fn doc(f: &FileDescriptorProto, path: &[i32]) -> Option<String> {
    let info = f.source_code_info.as_ref()?;
    info.location
        .iter()
        .find(|l| l.path == path)
        .and_then(|l| l.leading_comments.clone())
        .filter(|c| !c.trim().is_empty())
}

/// Every element that must be documented, with its path and a readable name.
fn undocumented(f: &FileDescriptorProto) -> Vec<String> {
    // Field numbers of FileDescriptorProto / DescriptorProto / ... in descriptor.proto.
    const MESSAGE: i32 = 4;
    const ENUM: i32 = 5;
    const SERVICE: i32 = 6;
    const MSG_FIELD: i32 = 2;
    const ENUM_VALUE: i32 = 2;
    const METHOD: i32 = 2;
    let mut missing = Vec::new();
    for (i, m) in f.message_type.iter().enumerate() {
        let i = i as i32;
        if doc(f, &[MESSAGE, i]).is_none() {
            missing.push(format!("message {}", m.name()));
        }
        assert!(
            m.nested_type.is_empty() && m.enum_type.is_empty(),
            "nested types: extend this test"
        );
        for (j, field) in m.field.iter().enumerate() {
            if doc(f, &[MESSAGE, i, MSG_FIELD, j as i32]).is_none() {
                missing.push(format!("field {}.{}", m.name(), field.name()));
            }
        }
    }
    for (i, e) in f.enum_type.iter().enumerate() {
        let i = i as i32;
        if doc(f, &[ENUM, i]).is_none() {
            missing.push(format!("enum {}", e.name()));
        }
        for (j, v) in e.value.iter().enumerate() {
            if doc(f, &[ENUM, i, ENUM_VALUE, j as i32]).is_none() {
                missing.push(format!("enum value {}", v.name()));
            }
        }
    }
    for (i, s) in f.service.iter().enumerate() {
        let i = i as i32;
        if doc(f, &[SERVICE, i]).is_none() {
            missing.push(format!("service {}", s.name()));
        }
        for (j, m) in s.method.iter().enumerate() {
            if doc(f, &[SERVICE, i, METHOD, j as i32]).is_none() {
                missing.push(format!("method {}.{}", s.name(), m.name()));
            }
        }
    }
    missing
}

#[test]
fn services_and_methods_are_described() {
    let set = descriptor_set();
    let inference = file(&set, "dsv2/v1/inference.proto");
    assert_eq!(inference.package(), "dsv2.v1");
    let svc = &inference.service[0];
    assert_eq!(
        format!("dsv2.v1.{}", svc.name()),
        dsv2_proto::INFERENCE_SERVICE_NAME
    );
    let methods: Vec<(&str, bool, bool)> = svc
        .method
        .iter()
        .map(|m| (m.name(), m.client_streaming(), m.server_streaming()))
        .collect();
    assert_eq!(
        methods,
        vec![
            ("Generate", false, false),
            ("GenerateStream", false, true),
            ("Tokenize", false, false),
            ("ModelInfo", false, false),
        ]
    );

    let expert = file(&set, "dsv2/expert/v1/expert.proto");
    assert_eq!(expert.package(), "dsv2.expert.v1");
    let svc = &expert.service[0];
    assert_eq!(
        format!("dsv2.expert.v1.{}", svc.name()),
        dsv2_proto::EXPERT_SHARD_SERVICE_NAME
    );
    let methods: Vec<(&str, bool, bool)> = svc
        .method
        .iter()
        .map(|m| (m.name(), m.client_streaming(), m.server_streaming()))
        .collect();
    assert_eq!(
        methods,
        vec![
            ("Info", false, false),
            ("Forward", true, true),
            ("NcclInit", false, false)
        ]
    );
}

#[test]
fn every_element_has_a_doc_comment() {
    let set = descriptor_set();
    for name in ["dsv2/v1/inference.proto", "dsv2/expert/v1/expert.proto"] {
        let missing = undocumented(file(&set, name));
        assert!(missing.is_empty(), "{name}: undocumented: {missing:?}");
    }
}

#[test]
fn enum_zero_values_are_unspecified() {
    let set = descriptor_set();
    for name in ["dsv2/v1/inference.proto", "dsv2/expert/v1/expert.proto"] {
        for e in &file(&set, name).enum_type {
            let zero = e
                .value
                .iter()
                .find(|v| v.number() == 0)
                .expect("zero value");
            assert!(
                zero.name().ends_with("_UNSPECIFIED"),
                "{name}: enum {} zero value is {}",
                e.name(),
                zero.name()
            );
        }
    }
}

#[test]
fn reflection_accepts_the_descriptor_set() {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dsv2_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("reflection v1 builds from FILE_DESCRIPTOR_SET");
    // Older reflection clients (ghz built on jhump/protoreflect, older grpcurl) speak v1alpha.
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dsv2_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("reflection v1alpha builds from FILE_DESCRIPTOR_SET");
}
